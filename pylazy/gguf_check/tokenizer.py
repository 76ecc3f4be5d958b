"""What libllama's tokenizer needs from a file: the vocabulary, merges, special token ids and
chat templates (see pylazy.gguf_check for the abort each check keeps away)."""
from __future__ import annotations

from ..errors import ModelLoadError
from .reader import GGUFInfo, array_length, get_kv

SUPPORTED_TOKENIZERS = ("llama", "gpt2")   # libllama SPM and byte-level BPE
SPECIAL_TOKEN_KEYS = (
    "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask",
    "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep",
    "prefix", "suffix", "middle",
)
TOKEN_TYPE_BYTE = 6



def check_tokenizer(info: GGUFInfo, array, n_vocab: int) -> None:
    model = get_kv(info, "tokenizer.ggml.model", "str")
    if model not in SUPPORTED_TOKENIZERS:
        raise ModelLoadError(f"tokenizer.ggml.model: '{model}' not supported (need one of {SUPPORTED_TOKENIZERS})")
    get_kv(info, "tokenizer.ggml.pre", "str", required=False)
    tokens = get_kv(info, "tokenizer.ggml.tokens", "arr[str]")
    if len(tokens) != n_vocab:
        raise ModelLoadError(f"tokenizer.ggml.tokens: {len(tokens)} tokens, token_embd has {n_vocab} rows")
    if (vs := get_kv(info, f"{info.arch}.vocab_size", "u32", n_vocab, required=False)) != n_vocab:
        raise ModelLoadError(f"{info.arch}.vocab_size: {vs}, token_embd has {n_vocab} rows")
    # libllama maps text -> id and asserts the map is as large as the list; it renames
    # an empty token to "[EMPTY_<id>]" first, so compare what it compares
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        word = tok or f"[EMPTY_{i}]"
        if word in seen:
            raise ModelLoadError(f"tokenizer.ggml.tokens: token {i} {word!r} duplicates token {seen[word]}")
        seen[word] = i
    if "tokenizer.ggml.scores" in info.metadata:
        if info.types["tokenizer.ggml.scores"] not in ("arr[f32]", "arr[i32]"):
            raise ModelLoadError("tokenizer.ggml.scores: must be an array of f32 or i32")
        if array_length(info, "tokenizer.ggml.scores") != n_vocab:
            raise ModelLoadError(f"tokenizer.ggml.scores: length {array_length(info, 'tokenizer.ggml.scores')} != {n_vocab} tokens")
    if "tokenizer.ggml.token_type" in info.metadata:
        get_kv(info, "tokenizer.ggml.token_type", "arr[i32]")
        if array_length(info, "tokenizer.ggml.token_type") != n_vocab:
            raise ModelLoadError(f"tokenizer.ggml.token_type: length "
                                 f"{array_length(info, 'tokenizer.ggml.token_type')} != {n_vocab} tokens")
        ttypes = array("tokenizer.ggml.token_type")
        for i, tt in enumerate(ttypes):
            if tt == TOKEN_TYPE_BYTE and not _is_byte_token(tokens[i]):
                raise ModelLoadError(f"tokenizer.ggml.token_type: byte token {i} {tokens[i]!r} is not '<0xXX>'")
    if model == "gpt2":
        get_kv(info, "tokenizer.ggml.merges", "arr[str]")
        merges = array("tokenizer.ggml.merges")
        for i, m in enumerate(merges):
            if m.find(" ", 1) < 0:
                raise ModelLoadError(f"tokenizer.ggml.merges: merge {i} {m!r} is not 'left right'")
    else:
        # SPM falls back to <0xXX> byte tokens for text it cannot match; a missing one
        # makes libllama throw out of llama_tokenize, which ends the process
        for b in range(256):
            if f"<0x{b:02X}>" not in seen and not (b < 0x80 and chr(b) in seen):
                raise ModelLoadError(f"tokenizer.ggml.tokens: SPM vocab lacks byte token <0x{b:02X}>")
    _check_special_tokens(info, model, n_vocab)


def _is_byte_token(tok: str) -> bool:
    return len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">") and \
        all(c in "0123456789abcdefABCDEF" for c in tok[3:5])


def _check_special_tokens(info: GGUFInfo, model: str, n_vocab: int) -> None:
    ids = {}
    for name in SPECIAL_TOKEN_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        tid = get_kv(info, key, "u32", required=False)
        if tid is not None and tid >= n_vocab:
            raise ModelLoadError(f"{key}: {tid} out of range for {n_vocab} tokens")
        ids[name] = tid
    flags = {}
    for k in ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix",
              "remove_extra_whitespaces"):
        flags[k] = get_kv(info, f"tokenizer.ggml.{k}", "bool", required=False)
    # libllama's defaults when a key is absent: SPM bos 1 / eos 2, BPE bos = eos = 11
    # (dropped when out of range); SPM adds BOS by default and some BPE pre-tokenizers do
    default_bos, default_eos = (1, 2) if model == "llama" else (11, 11)
    for which, default, add in (("bos", default_bos, flags["add_bos_token"]),
                                ("eos", default_eos, flags["add_eos_token"])):
        tid = ids[which] if ids[which] is not None else (default if default < n_vocab else None)
        may_add = add if add is not None else which == "bos"
        if may_add and tid is None:
            raise ModelLoadError(f"tokenizer.ggml.{which}_token_id: missing, but the tokenizer adds {which.upper()}")


def check_chat_templates(info: GGUFInfo) -> None:
    """llama-cpp-python compiles every tokenizer.chat_template* string with Jinja2 when
    it opens a model and raises on a syntax error; check them the same way here."""
    keys = [k for k in info.metadata if k == "tokenizer.chat_template" or k.startswith("tokenizer.chat_template.")]
    if not keys:
        return
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:   # no Jinja2, no one to compile the template either
        return

    class GenerationTag(jinja2.ext.Extension):
        # HF templates may wrap assistant text in {% generation %}...{% endgeneration %}
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    for key in keys:
        if info.types[key] != "str":
            continue   # llama-cpp-python only sees string values
        try:
            env.parse(info.metadata[key])
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"{key}: invalid Jinja2 template ({e})") from None
