"""What every moeforge console job shares: compose a Hydra config, and fail in one line.

Jobs compose `conf/` (the `moeforge.conf` package, the same source as config_path="pkg://moeforge.conf")
with Hydra's compose API, so a bad override, an unknown option or a wrong value reaches the job as an
exception it can print as one line with exit status 2 -- never a traceback for a user error.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from moeforge.platform.config.builder import ConfigError
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

CONFIG_MODULE = "moeforge.conf"

# Errors that mean "the user asked for something wrong", printed as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, HydraException, OmegaConfBaseException)


def one_line(err: BaseException) -> str:
    """The error's message folded onto one line, without Hydra's appended config search path, and
    with its cause when it has one (Hydra's "Could not override" hides "Key 'foo' is not in struct")."""
    parts = [str(err).split("Config search path")[0]]
    if err.__cause__ is not None:
        parts.append(str(err.__cause__).split("full_key:")[0])
    return " ".join(" ".join(part.split()) for part in parts).strip()


def compose_values(config_name: str, overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Compose conf/<config_name>.yaml with overrides; return (plain values, group choices)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        composed = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    choices = {k: str(v) for k, v in composed.hydra.runtime.choices.items() if v is not None}
    with open_dict(composed):
        del composed["hydra"]  # its run/sweep dirs interpolate job fields that compose leaves unset
    return OmegaConf.to_container(composed, resolve=True), choices


def run_cli(
    prog: str,
    doc: str,
    argv: Sequence[str] | None,
    run: Callable[[list[str]], str],
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """`-h` prints doc; otherwise print run(argv). A user error prints `prog: error: ...` and
    returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        return 0
    try:
        print(run(argv))
    except USER_ERRORS + errors as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


def settable_overrides(overrides: Sequence[str], sections: Mapping[str, type]) -> list[str]:
    """Overrides as the docs write them, made acceptable to Hydra.

    A group's YAML lists only some of its dataclass's keys, and Hydra refuses to set a key the
    composed config lacks unless it is written `+key=value`. So `section.key=value`, where `key` is
    a field of that section's config dataclass, becomes `++section.key=value` (set it, listed or not);
    a key that is no field is refused here in one line naming the closest valid key. Group choices
    (`parallel=dualpipe_pp2`), `+`/`~` forms, flags and `hydra.` keys pass through unchanged."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, rest = key.partition(".")
        if not sep or not dot or item.startswith(("+", "~", "-")) or section not in sections:
            out.append(item)
            continue
        field = rest.split(".", 1)[0]
        names = {f.name.rstrip("_") for f in dataclasses.fields(sections[section])}  # init.from: from_
        if field not in names:
            close = difflib.get_close_matches(field, sorted(names), n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"known: {', '.join(sorted(names))}"
            raise ConfigError(f"{section}.{field}: unknown key ({hint})")
        out.append(f"++{key}={value}")
    return out
