"""The `warmpod` command: dispatches a subcommand to the component that owns it.

Each component parses its own arguments; this module only picks the component, importing it lazily so that
`warmpod load` in the sidecar image never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from warmpod import __version__

# subcommand → (module, help). The module has `main(argv) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "load": ("warmpod.loader.cli", "stream a safetensors model into the shared-memory store"),
    "serve": ("warmpod.server.cli", "serve a staged model over Open Inference Protocol v2 and OpenAI embeddings"),
    "up": ("warmpod.pods.up", "stage a model, serve it with workers on one port, and scale them on a latency SLO"),
    "edge": ("warmpod.wasm.cli", "compile a model for the WebAssembly edge engine, or serve it (same protocol)"),
    "node": ("warmpod.node.cli", "the node agent: one store per node, handed to pods as read-only CSI volumes"),
    "store": ("warmpod.node.ls", "inspect a store: `warmpod store ls ROOT` lists its models and versions"),
}


def usage() -> str:
    lines = ["usage: warmpod COMMAND [ARGS...]", "       warmpod --version", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'warmpod COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"warmpod {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"warmpod: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    command: Callable[[Sequence[str]], int] = importlib.import_module(COMMANDS[name][0]).main
    return command(rest)
