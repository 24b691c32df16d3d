"""The `tbg` command line: one entry point, one subcommand per job.

Every subcommand takes its options from flags and, optionally, from a TOML config file
(`--config run.toml`, keys named like the long flags with dashes or underscores); flags win over
the file. Jobs that produce files write them into `--out` together with the resolved config.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("tbg")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def _cmd_info(args: argparse.Namespace) -> None:
    import torch

    import tbg

    info = tbg.build_info()
    rows = [("tbg", tbg.__version__), ("torch (built against)", info["torch"]),
            ("torch (running)", torch.__version__), ("CUDA compiled", info["cuda"] or "no"),
            ("CUDA archs", ", ".join(info["cuda_arch"]) or "-"), ("compiler", info["compiler"]),
            ("library", info["library"]), ("ops", ", ".join(f"torch.ops.tbg.{op}" for op in info["ops"]))]
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    rows.append(("devices", ", ".join(devices)))
    for device in ("cpu", "cuda"):
        kernels = [op for op in info["ops"] if tbg.has_kernel(op, device)]
        rows.append((f"{device} kernels", ", ".join(kernels) or "none"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


# Subcommands: name -> (help, configure-parser, run). Other modules add theirs in _register().
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
COMMANDS: dict[str, Command] = {
    "info": ("show how tbg was built, which devices and kernels are available", lambda p: None, _cmd_info),
}


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file not found: {file}")
    try:
        with file.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {file} is not valid TOML: {err}") from err
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbg",
        description="Transferable Boltzmann Generators with fused EGNN and exact-divergence kernels.",
        epilog="Run `tbg <command> --help` for a command's options. Quick start: `tbg demo`.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (help_text, configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("--config", metavar="FILE", help="TOML file with options (flags override it)")
        configure(p)
        p.set_defaults(_run=run, _parser=p)
    return parser


def _apply_config(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill options not given on the command line from the config file; reject unknown keys."""
    config = _load_config(getattr(args, "config", None))
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in config.items():
        if not hasattr(args, key) or key.startswith("_") or key in ("command", "config"):
            raise UsageError(f"unknown option '{key}' in config file {args.config}; see `tbg {args.command} --help`")
        if key not in given:
            setattr(args, key, value)


def write_resolved_config(args: argparse.Namespace, out_dir: Path) -> None:
    """Record the options a run used in out_dir/config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    (out_dir / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _register()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        _apply_config(args, argv)
        args._run(args)
    except UsageError as err:
        args._parser.error(str(err))  # prints usage + message, exits 2
    except (FileNotFoundError, ValueError) as err:
        print(f"tbg {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tbg {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def _register() -> None:
    """Add the subcommands whose implementations live in tbg's modules."""


if __name__ == "__main__":
    sys.exit(main())
