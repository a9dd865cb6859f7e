"""``python -m star_elastic_jax.launcher [flags] [--] <star-elastic args>``: initialize JAX's
distributed runtime (:mod:`star_elastic_jax.distributed`), then run the ``star-elastic`` CLI in the
same process. The launch scripts in ``launch/`` call it once per host. It lives above both the CLI and
``distributed`` so that the library never calls back into the CLI."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from star_elastic_jax.distributed import add_flags, config_from_args, initialize
from star_elastic_jax.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m star_elastic_jax.launcher [flags] [--] <star-elastic args>``: initialize, then run
    the CLI (``train --config ... --workdir ...``) in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        own, rest = argv[:i], argv[i + 1:]
    else:
        own, rest = argv, []
    parser = add_flags(argparse.ArgumentParser(
        prog="python -m star_elastic_jax.launcher",
        description="Initialize JAX's distributed runtime, then run `star-elastic <args after -->`."))
    args, unknown = parser.parse_known_args(own)
    rest = unknown + rest
    try:
        cfg = initialize(config_from_args(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    print(f"[star_elastic_jax.distributed] process {jax.process_index()}/{jax.process_count()} ({cfg.source}); "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices", file=sys.stderr, flush=True)
    if not rest:
        return 0
    from star_elastic_jax.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
