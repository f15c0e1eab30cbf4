"""Train CE-Net (or a baseline) with the paper's recipe, or a named one.

    python main.py                                  # constants.py as it is (the paper's recipe)
    python main.py --recipe cpu                     # 20 to 40 minutes on a 2-core CPU (see README)
    python main.py --resume weights/RUN/last.pth    # continue a stopped run exactly
    python main.py --data-root ../DRIVE --epochs 300
    torchrun --nproc_per_node=4 main.py ...         # several GPUs, same checkpoint format

Writes weights/<run>/final.pth (plus settings.json, train_log.csv and training_curve.png) and never
replaces an earlier run. Every CHECKPOINT_EVERY steps (at least CHECKPOINT_MIN_SECONDS apart), and when
stopped with Ctrl-C or SIGTERM, the run so far is saved to weights/<run>/last.pth; --snapshot-every N also
keeps the weights of every N-th step (weights/<run>/step_<N>.pth) for a learning curve in the test metric.
"""
import argparse

import cli
import devices
import training


def parse_settings(argv=None):
    """(settings, the names given on the command line)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_constant_flags(parser)
    return cli.settings_from(parser.parse_args(argv))


def main(argv=None):
    settings, given = parse_settings(argv)
    try:
        training.train(settings, given)
        devices.close_distributed()
    finally:
        devices.close_distributed(finished=False)  # a no-op when the run already closed it


if __name__ == "__main__":
    cli.run(main)
