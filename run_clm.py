"""Train Mixtral on PyTorch/XLA with the MLPerf reference's knobs (see README.md).

usage: python run_clm.py [KEY=VALUE ...] [+experiment=NAME] [--cfg] [--help]

  KEY=VALUE     any knob of clm/conf/config.yaml, e.g. max_steps=10 model.capacity_factor=0
  GROUP=OPTION  a config group: {groups}
  --cfg         print the resolved config and exit
Related: python -m clm.plan TOPOLOGY [overrides]    python -m clm.data.check [overrides]
"""

import sys

from clm.cli import run_command


def main(argv: list[str]) -> int | None:
    # Config first, heavy imports after: a typo is reported before torch and XLA load.
    from clm.config import config_groups, load_config
    from clm.engine import device_count

    if "--help" in argv or "-h" in argv:
        groups = "; ".join(f"{group}={'|'.join(options)}" for group, options in config_groups().items())
        print(__doc__.format(groups=groups).strip())
        return
    cfg = load_config([a for a in argv if a != "--cfg"], num_devices=device_count)
    if "--cfg" in argv:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg), end="")
        return
    from clm.train import exit_code, train

    return exit_code(train(cfg))


if __name__ == "__main__":
    sys.exit(run_command(lambda: main(sys.argv[1:])))
