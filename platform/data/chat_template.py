"""A tokenizer's chat template, read from the Hugging Face layout and rendered as Hugging Face does.

The template is the `chat_template` string of the `tokenizer_config.json` beside a tokenizer.json (or
the `chat_template.jinja` file beside it, which transformers writes and prefers). It is rendered with
jinja2 in a sandbox, with Hugging Face's environment (trim_blocks, lstrip_blocks, loop controls, the
`tojson` filter, `raise_exception`, `strftime_now`; a `{% generation %}` block renders its body) and
Hugging Face's variables: `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (the last two
only when the config names them).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from moeforge.platform.data.corpus import CorpusError
from moeforge.platform.outputs.storage import S3Options, is_s3, open_storage

CONFIG_FILE = "tokenizer_config.json"
JINJA_FILE = "chat_template.jinja"
_COMPILED: dict[str, object] = {}  # per process: template sha256 -> compiled jinja2 Template


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token strings it is rendered with. Plain data, so it travels
    to Ray workers; the jinja2 template is compiled once per process on first use."""

    text: str  # the jinja2 source
    source: str  # where it was read (tokenizer_config.json or chat_template.jinja), for messages
    bos_token: str | None = None
    eos_token: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (file name, text) of the files it was read from

    @property
    def sha256(self) -> str:
        """sha256 of the template text: equal hashes render identically."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`; a template that raises (`raise_exception`, a bad
        variable) fails as CorpusError naming the template's file."""
        import jinja2

        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        template = _compiled(self)
        try:
            return template.render(**variables)
        except jinja2.TemplateError as err:
            raise CorpusError(f"chat template {self.source} refused the conversation: {err}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as err:  # e.g. a field the template expects
            raise CorpusError(
                f"chat template {self.source} failed on the conversation: {type(err).__name__}: {err}"
            ) from None


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_text(folder: str, name: str, s3: S3Options | None) -> str | None:
    """A file beside the tokenizer (local folder or s3:// prefix), None when it does not exist."""
    if is_s3(folder):
        storage = open_storage(folder, s3, check=False)
        return storage.read_text(name) if storage.exists(name) else None
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_chat_template(tokenizer_path: str, s3: S3Options | None = None) -> ChatTemplate:
    """The chat template beside `tokenizer_path` (a tokenizer.json, local or s3://). Fails naming the
    tokenizer_config.json path when there is none, or when the template does not parse."""
    folder = tokenizer_path.rpartition("/")[0] if is_s3(tokenizer_path) else os.path.dirname(tokenizer_path)
    config_path = f"{folder}/{CONFIG_FILE}" if is_s3(folder) else os.path.join(folder, CONFIG_FILE)
    config_text = _read_text(folder, CONFIG_FILE, s3)
    config: dict = {}
    if config_text is not None:
        try:
            config = json.loads(config_text)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{config_path}: not valid JSON ({err.msg})") from None
        if not isinstance(config, dict):
            raise CorpusError(f"{config_path}: not a JSON object")
    files = [] if config_text is None else [(CONFIG_FILE, config_text)]
    jinja_text = _read_text(folder, JINJA_FILE, s3)
    if jinja_text is not None:
        text, source = jinja_text, config_path.removesuffix(CONFIG_FILE) + JINJA_FILE
        files.append((JINJA_FILE, jinja_text))
    else:
        text, source = config.get("chat_template"), config_path
        if isinstance(text, list):  # several named templates: the "default" one
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(text, str) or not text.strip():
        where = "no such file" if config_text is None else "no chat_template in it"
        raise CorpusError(
            f"{config_path}: {where}; format=conversations renders each conversation with the tokenizer's "
            f"chat template (a chat_template string in {CONFIG_FILE}, or {JINJA_FILE}, beside the tokenizer)"
        )
    template = ChatTemplate(
        text, source, _token_string(config.get("bos_token")), _token_string(config.get("eos_token")), tuple(files)
    )
    _compiled(template)  # a template that does not parse fails now, before any work
    return template


def _compiled(template: ChatTemplate):
    import jinja2

    found = _COMPILED.get(template.sha256)
    if found is None:
        try:
            found = _COMPILED[template.sha256] = _environment().from_string(template.text)
        except jinja2.TemplateSyntaxError as err:
            raise CorpusError(
                f"{template.source}: chat_template does not parse (line {err.lineno}: {err.message})"
            ) from None
    return found


def _environment():
    """Hugging Face's rendering environment (transformers' chat_template_utils), in a sandbox."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: Hugging Face marks assistant text with it; the
        body renders as is (masks come from prefix rendering here, not from these marks)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
