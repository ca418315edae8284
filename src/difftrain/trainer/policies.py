"""When the loop logs, samples and checkpoints: small policies, each owning the step it
last acted at."""

from dataclasses import dataclass


@dataclass
class Every:
    """Due every ``every`` steps (and at ``last``, the stage's final step, when
    ``at_last``); ``done`` remembers the step it was last done at."""

    every: int
    last: int
    at_last: bool = False
    enabled: bool = True
    done_at: int = 0

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        return step % self.every == 0 or (self.at_last and step == self.last)

    def done(self, step: int) -> None:
        self.done_at = step

    def missed(self, step: int) -> bool:
        """Whether ``step`` (the stage's end) still wants it: it was not done there."""
        return self.enabled and self.done_at != step


def logging(total: int) -> Every:
    """About 2,000 records over a stage, and one at its last step."""
    return Every(max(1, total // 2000), total, at_last=True)
