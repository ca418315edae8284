"""A slow link to the real S3 server: an HTTP proxy on 127.0.0.1 that holds back the
requests whose path matches a pattern for a set time before passing them on unchanged.

Headers, Host included, go through as they came, so the clients' signatures still hold
and the S3 server checks them as usual. Each delayed request's start and end are kept,
so a test can tell how long an upload took.
"""

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Hop-by-hop headers, which a proxy does not pass on.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Delays:
    pattern: re.Pattern | None = None
    seconds: float = 0.0
    held: list[tuple[str, float, float]] = field(default_factory=list)  # path, start, end

    def span(self) -> float:
        """Seconds from the first held request's start to the last one's end."""
        return max(end for _, _, end in self.held) - min(start for _, start, _ in self.held)


class SlowS3:
    """The proxy, serving until :meth:`close`."""

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.delays = Delays()
        delays = self.delays

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raise RuntimeError("chunked request bodies are not supported")
                body = self.rfile.read(length) if length else None
                start = time.monotonic()
                held = delays.pattern is not None and delays.pattern.search(self.path)
                if held:
                    time.sleep(delays.seconds)
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=300)
                connection.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    if name.lower() not in _HOP:
                        connection.putheader(name, value)
                connection.endheaders(body)
                response = connection.getresponse()
                data = response.read()
                connection.close()
                if held:
                    delays.held.append((self.path, start, time.monotonic()))
                self.send_response_only(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in _HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = response.getheader("Content-Length")
                if self.command != "HEAD":
                    length = str(len(data))
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def hold(self, pattern: str, seconds: float) -> None:
        """Hold back each request whose path matches ``pattern`` for ``seconds``."""
        self.delays.pattern, self.delays.seconds = re.compile(pattern), seconds

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
