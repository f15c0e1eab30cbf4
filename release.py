"""Make a checkpoint for distribution: float16 weights (half the size), its record kept, its SHA-256 printed.

    python release.py weights/drive_cpu_cenet/final.pth weights/released/cenet_drive_cpu.pth

The copy is what users evaluate with `python test.py --checkpoint ...`; publish the numbers test.py gives
for the copy itself, since float16 weights shift the probabilities slightly (about 1e-3).
"""
import argparse
import hashlib

import cli
import framework


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a final.pth written by main.py")
    parser.add_argument("target", help="where the release copy goes (never replaced)")
    parser.add_argument("--git-commit", default=None,
                        help="the commit the run was trained at, where the checkpoint does not record one")
    return parser.parse_args(argv)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None):
    args = parse_args(argv)
    extra = {"git_commit": args.git_commit} if args.git_commit else {}
    target = framework.release_checkpoint(args.source, args.target, **extra)
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB), SHA-256 {sha256(target)}")


if __name__ == "__main__":
    cli.run(main)
