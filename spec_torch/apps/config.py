"""The packaged Hydra configs, composed from Python: ``compose("compare", ["top_k=5"])``.

``spec_torch.apps.compare.run`` and ``spec_torch.apps.align.pipeline.run`` call :func:`load_config`, so a
notebook passes only what it changes::

    from spec_torch.apps.compare import run
    run(["experiment=demo", "hydra.run.dir=out"])           # Hydra overrides, as on the command line
    run({"top_k": 5, "data": "features", "data.x_path": "a.npy", "data.y_path": "b.npy"})
    run()                                                     # the packaged defaults (the offline demo)

Configs live in ``spec_torch/apps/configs/<command>/`` (the primary ``<command>.yaml`` and its ``experiment/``
presets) and ``spec_torch/apps/configs/{data,encoder,kernel}/`` (groups shared by the commands).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import SpecError

__all__ = [
    "CONFIG_PACKAGE",
    "config_dir",
    "compose",
    "load_config",
    "group_overrides",
    "instantiate_target",
    "for_setting",
    "check_overrides",
]

#: the package holding the configs (Hydra: ``pkg://spec_torch.apps.configs``)
CONFIG_PACKAGE = "spec_torch.apps.configs"


def config_dir(command: str | None = None) -> Path:
    """The folder of the packaged configs (of one command when ``command`` is given)."""
    root = Path(str(resources.files(CONFIG_PACKAGE)))
    return root / command if command else root


def _groups(command: str) -> dict[str, str]:
    """Config key -> group of the command's defaults list (``encoder_x`` -> ``encoder@encoder_x``)."""
    primary = OmegaConf.load(config_dir(command) / f"{command}.yaml")
    out = {}
    for item in primary.get("defaults", []):
        if isinstance(item, (DictConfig, dict)):
            for key in item:
                group, _, package = str(key).partition("@")
                out[package or group] = str(key)
    return out


def shared_groups_help(command: str) -> str:
    """What ``spec-torch COMMAND --help`` lists for the groups shared by every command (``data/``,
    ``encoder/``, ``kernel/``): one line per shared group of the command's defaults, with the keys it is
    chosen under and its packaged options (``encoder@encoder_x, encoder@encoder_y: minilm, ...``).

    Hydra's own listing (``$APP_CONFIG_GROUPS``) shows only the command's folder (its ``experiment/``
    presets): the shared folders join the search path later, from the primary config's ``hydra.searchpath``.
    """
    used_as: dict[str, list[str]] = {}
    for key in _groups(command).values():
        group = key.partition("@")[0]
        if group != "experiment" and (config_dir() / group).is_dir():
            used_as.setdefault(group, []).append(key)
    return "\n".join(
        f"{', '.join(keys)}: {', '.join(sorted(p.stem for p in (config_dir() / group).glob('*.yaml')))}"
        for group, keys in used_as.items()
    )


def group_overrides(command: str, settings: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Split a dict of settings into Hydra group choices (``{"data": "features"}`` -> ``data=features``,
    ``{"encoder_x": "minilm"}`` -> ``encoder@encoder_x=minilm``, ``experiment``) and values to merge."""
    groups = _groups(command)
    choices, values = [], {}
    for key, value in settings.items():
        if key in groups and isinstance(value, str):
            choices.append(f"{groups[key]}={value}")
        else:
            values[key] = value
    return choices, values


def compose(command: str, overrides: Sequence[str] = (), hydra_config: bool = False) -> DictConfig:
    """The command's packaged config with Hydra ``overrides`` (``key=value``, ``group=option``) applied
    (with its ``hydra`` section when ``hydra_config``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose from a fresh state, then back
        saved = GlobalHydra.instance().hydra
        GlobalHydra.instance().clear()
    else:
        saved = None
    try:
        with initialize_config_module(f"{CONFIG_PACKAGE}.{command}", version_base="1.3"):
            return hydra_compose(
                config_name=command, overrides=list(overrides), return_hydra_config=hydra_config
            )
    finally:
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


#: Hydra's flags that take a value (the next argument), and those after which the overrides are not a run's
_FLAG_VALUES = ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name", "-c", "--cfg", "-p",
                "--package", "--experimental-rerun")  # fmt: skip
_NOT_A_RUN = ("-h", "--help", "--hydra-help", "-i", "--info", "--shell-completion", "-sc")
#: difflib's similarity ratio above which an unknown key gets "did you mean" (top_kk -> top_k: 0.91)
SUGGEST_CUTOFF = 0.8


def _options(command: str, group: str) -> list[str] | None:
    """The packaged options of a config group (``kernel`` -> cosine, gaussian, ...); None if it is no group."""
    for root in (config_dir(command), config_dir()):
        if (root / group).is_dir():
            return sorted(p.stem for p in (root / group).glob("*.yaml"))
    return None


def _setting_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config (``top_k``, ``data.n``, ``kernel_x.sigma``, ...)."""
    out = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            out.append(path)
            out.extend(_setting_keys(node._get_node(key), f"{path}."))
    return out


def _did_you_mean(key: str, keys: Sequence[str]) -> str:
    keys = [k for k in keys if not key.startswith(f"{k}.")]  # not the node the key would be added to
    near = difflib.get_close_matches(key, keys, n=3, cutoff=SUGGEST_CUTOFF)
    return f"; did you mean {' or '.join(near)}?" if near else ""


def _under_target(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` lies inside a node that names a class by ``_target_`` (which reads every key it gets)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        node = OmegaConf.select(cfg, ".".join(parts[:i]), default=None)
        if isinstance(node, DictConfig) and "_target_" in node:
            return True
    return False


def check_overrides(command: str, args: Sequence[str]) -> list[str]:
    """Check a command line's overrides against the composed config before Hydra runs; the warnings to print.

    Raises :class:`SpecError` (one line) for a preset that does not exist (``kernel@kernel_x=cosin``: the
    choices) and for a key the config does not have (``top_kk=5``: "did you mean top_k", from the composed
    config's keys, :data:`SUGGEST_CUTOFF`), where Hydra would advise ``+top_kk=5``, which runs with ``top_k``
    unchanged. Returns a warning for each ``+key``/``++key`` that adds a setting nothing reads (not inside a
    ``_target_`` node). With ``--config-dir``, another primary config, or a line Hydra cannot parse, nothing is
    checked here (Hydra reports it).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a in _NOT_A_RUN for a in args) or any(
        a in ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")
        or a.startswith(
            ("--config-dir=", "--config-path=", "--config-name=", "hydra.searchpath", "+hydra.searchpath")
        )
        for a in args
    ):
        return []
    lines, skip = [], False
    for a in args:
        if skip or a.startswith("-"):
            skip = not skip and a in _FLAG_VALUES
            continue
        lines.append(a)
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception:  # Hydra's parser error: Hydra reports it with its own message
        return []
    choices, values = [], []
    for o in overrides:
        group = o.key_or_group
        options = _options(command, group) if not o.is_delete() and "." not in group else None
        if options is None:
            values.append(o)
            continue
        wanted = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        for value in wanted:
            if isinstance(value, str) and value not in options:
                near = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else ""
                raise SpecError(
                    f"{o.get_key_element()}: unknown option {value!r}; choices: {', '.join(options)}{hint}"
                )
        if wanted and isinstance(wanted[0], str):
            choices.append(f"{o.get_key_element()}={wanted[0]}")
    try:
        cfg = compose(command, choices)
    except Exception:  # a choice Hydra cannot compose: Hydra reports it
        return []
    keys = _setting_keys(cfg)
    warnings = []
    for o in values:
        key = o.key_or_group
        if key.split(".")[0] == "hydra" or "/" in key or o.is_delete():  # Hydra's own settings and groups
            continue
        if _has_key(cfg, key) or _under_target(cfg, key):
            continue
        if o.is_add() or o.is_force_add():
            warnings.append(
                f"{o.input_line}: adds a setting that spec-torch {command} does not read; it has no effect"
                + _did_you_mean(key, keys)
            )
        else:
            raise SpecError(
                f"{key}: spec-torch {command} has no such setting{_did_you_mean(key, keys)} "
                f"(`spec-torch {command} --cfg job` prints every setting)"
            )
    return warnings


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` is a setting of ``cfg`` (a mandatory ``???`` value counts; list items too)."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, ListConfig):
            return True
        if not isinstance(node, DictConfig):
            return False
        if part not in node.keys():  # keys(): mandatory ??? values included, unlike `in`
            return False
        node = node._get_node(part)
    return True


def _is_complete(command: str, cfg: DictConfig) -> bool:
    """True for a config composed in full (e.g. by ``@hydra.main``): every top-level key of the command's."""
    primary = OmegaConf.load(config_dir(command) / f"{command}.yaml")
    keys = {k for k in primary if k not in ("defaults", "hydra")} | set(_groups(command))
    keys.discard("experiment")
    return keys <= set(cfg.keys())


def load_config(command: str, cfg: Any = None) -> DictConfig:
    """A complete config of ``command`` from a partial one, starting from the packaged defaults.

    Args:
        command: ``"compare"`` or ``"align"`` (a folder of ``spec_torch/apps/configs``).
        cfg: None (the defaults); a list of Hydra overrides; a dict (group choices such as
            ``{"data": "features"}`` or ``{"experiment": "demo"}`` are applied as overrides, other keys
            merged; dotted keys allowed); or a DictConfig, used as it is when complete (from ``@hydra.main``)
            and merged onto the defaults otherwise.

    Raises:
        SpecError: on an override Hydra cannot apply, or a type that is none of these.
    """
    if isinstance(cfg, DictConfig) and _is_complete(command, cfg):
        return cfg
    if cfg is None:
        overrides, values = [], {}
    elif isinstance(cfg, (list, tuple, ListConfig)):
        overrides, values = [str(o) for o in cfg], {}
    elif isinstance(cfg, (Mapping, DictConfig)):
        plain = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
        overrides, values = group_overrides(command, plain)
    else:
        raise SpecError(
            f"cfg: expected None, a list of overrides, a dict or a DictConfig, got {type(cfg).__name__}"
        )
    try:
        base = compose(command, overrides, hydra_config=True)
    except Exception as exc:  # Hydra's own errors: one line naming the override
        if type(exc).__module__.startswith(("hydra", "omegaconf")):
            raise SpecError(f"overrides: {' '.join(str(exc).split())}") from None
        raise
    OmegaConf.set_struct(base, False)
    run_dir = (
        base.hydra.run.dir
    )  # outside Hydra, the run folder Hydra would have made (outputs/<command>/...)
    del base["hydra"]
    for key, value in values.items():  # dotted keys ("data.x_path") address nested settings
        OmegaConf.update(base, key, value, merge=True)
    if base.get("output_dir") is None:
        base.output_dir = str(run_dir)
    return base


def instantiate_target(node: Any, name: str) -> Any:
    """A config node naming a class by Hydra's ``_target_`` -> that object (``hydra.utils.instantiate``);
    any other node is returned unchanged. Lets a user's own encoder or kernel class be named in a config::

        # my_configs/kernel/mine.yaml, used as: spec-torch compare --config-dir my_configs kernel@kernel_x=mine
        _target_: mypackage.MyKernel     # a spec_torch.Kernel subclass
        width: 3
    """
    if not (isinstance(node, Mapping) and "_target_" in node):
        return node
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(dict(node))
    except InstantiationException as exc:
        raise SpecError(
            f"{name}._target_: could not build {node['_target_']!r}: {' '.join(str(exc).split())}"
        ) from None


def for_setting(message: str, which: str) -> str:
    """An encoder's error message with its ``encoder.`` settings named as the config key ``which`` holds
    them under (``encoder.checkpoint=`` -> ``encoder_x.checkpoint=``): overrides that work as printed."""
    return re.sub(r"\bencoder\.", f"{which}.", message)


#: the ``accumulate_dtype`` settings of the pipelines' configs (dtype of the streamed sums: float64 keeps a
#: million float32 rows summed to full float32 accuracy)
ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_run_settings(cfg: Any, positive: Sequence[str], non_negative: Sequence[str] = ()) -> None:
    """The settings the pipelines share, checked before any work: integer counts (``positive`` >= 1,
    ``non_negative`` >= 0), ``eta`` (a finite number > 0) and ``accumulate_dtype`` (float32 or float64)."""
    for keys, low, what in ((positive, 1, "a positive integer"), (non_negative, 0, "an integer >= 0")):
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError(f"{key}: expected {what}, got {value!r}")
    eta = cfg.get("eta")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or not math.isfinite(eta):
        raise SpecError(f"eta: expected a positive number, got {eta!r}")
    if cfg.get("accumulate_dtype", "float64") not in ACCUMULATE_DTYPES:
        raise SpecError(f"accumulate_dtype: expected float32 or float64, got {cfg.get('accumulate_dtype')!r}")
