"""A small CLIP tokenizer built offline, for the built-in presets.

CLIP's tokenizer is byte-level BPE with an end-of-word marker. Real vocabularies come
with real models; the presets need one that exists without a download, so we learn BPE
merges here from a fixed word list until every listed word is a single token. That keeps
captions short and lets Textual Inversion use words like "cat" as initializer tokens.
"""

import collections
import functools
import itertools

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Words of the built-in shapes captions, and of common prompts and prompt templates.
WORDS = """
a an the of on in with and at by to for this that is
red orange yellow green blue purple pink white black gray grey brown cyan magenta
circle square triangle star ring diamond cross heart hexagon
small medium large big tiny huge
top bottom left right center middle corner upper lower
background shape shapes picture image photo photograph painting drawing render
style art artwork portrait close up view dark bright clean
cat dog person man woman car house tree flower sky sea mountain bird
sks toy object thing good nice cool weird
""".split()


@functools.cache
def byte_symbols() -> tuple[str, ...]:
    """The printable character standing for each byte value (GPT-2/CLIP byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, spare = {}, 0
    for value in range(256):
        if value in printable:
            symbols[value] = chr(value)
        else:
            symbols[value] = chr(256 + spare)
            spare += 1
    return tuple(symbols[value] for value in range(256))


def _word_symbols(word: str) -> tuple[str, ...]:
    chars = [byte_symbols()[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each of ``words`` one token; ties break alphabetically."""
    corpus = [list(_word_symbols(word)) for word in sorted(set(words))]
    merges = []
    while True:
        pairs = collections.Counter(
            pair for symbols in corpus for pair in itertools.pairwise(symbols)
        )
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        corpus = [_merge(symbols, best) for symbols in corpus]


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            out.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            out.append(symbols[index])
            index += 1
    return out


def build_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The presets' tokenizer: every byte, plus one token per word of :data:`WORDS`."""
    merges = learn_merges(WORDS)
    tokens = [*byte_symbols(), *(s + END_OF_WORD for s in byte_symbols())]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
    )


# T5's special tokens, at the ids T5 gives them.
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
WORD_START = "\u2581"  # SentencePiece's mark of a word's first piece


def build_t5_tokenizer(max_length: int = 32):
    """A small T5 (SentencePiece Unigram) tokenizer built offline for the presets: the
    special tokens, one piece per word of :data:`WORDS`, and every printable ASCII
    character alone and at a word's start, so that any caption tokenizes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    characters = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)]
    pieces += [(WORD_START + word, -1.0) for word in dict.fromkeys(WORDS)]
    pieces += [(WORD_START, -5.0)]
    pieces += [(WORD_START + c, -8.0) for c in characters] + [(c, -10.0) for c in characters]
    first = {}  # a word's own piece wins over the same letters as a character
    for piece, score in pieces:
        first.setdefault(piece, score)
    model = Tokenizer(models.Unigram(list(first.items()), unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START)
    model.decoder = decoders.Metaspace(replacement=WORD_START)
    return T5TokenizerFast(
        tokenizer_object=model,
        eos_token=T5_EOS,
        pad_token=T5_PAD,
        unk_token=T5_UNK,
        extra_ids=0,
        model_max_length=max_length,
    )
