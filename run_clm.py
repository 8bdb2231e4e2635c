"""Train Mixtral on PyTorch/XLA: `python run_clm.py [hydra overrides]` (see README.md)."""

import sys

from clm.errors import UserError


def main() -> int:
    # Config first, heavy imports after: a typo is reported before torch and XLA load.
    from clm.config import load_config
    from clm.runtime import device_count

    try:
        cfg = load_config(sys.argv[1:], num_devices=device_count)
        from clm.train import train

        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
