"""Optional live curves and sample predictions in a visdom server, never in training's way."""
import logging
import sys

import torch


class VisdomLogger:
    """Loss / LR curves and a sample (image, label, prediction) in a visdom environment.

    When no server answers, says so once and turns into a no-op, so training never depends on it.
    """

    def __init__(self, server, port, env, enabled=True):
        self.env, self.viz = env, None
        if not enabled:
            return
        try:
            from visdom import Visdom
            logging.getLogger("visdom").setLevel(logging.CRITICAL)
            viz = Visdom(server=server, port=port, env=env, raise_exceptions=True, use_incoming_socket=False)
            if viz.check_connection(timeout_seconds=2):
                self.viz = viz
        except Exception:  # visdom raises bare ConnectionErrors of several kinds
            self.viz = None
        if self.viz is None:
            print(f"notice: no visdom server at {server}:{port}; training goes on without live plots "
                  f"(start one with `python -m visdom.server`)", file=sys.stderr)

    def scalar(self, window, step, value):
        if self.viz is None:
            return
        try:
            update = "append" if self.viz.win_exists(window, env=self.env) else None
            self.viz.line(X=[step], Y=[value], win=window, env=self.env, update=update,
                          opts={"title": window, "xlabel": "step"})
        except Exception:
            self._lost()

    def sample(self, image, label, probs):
        """Image, label and prediction side by side (the prediction is the foreground probability,
        or the argmax class scaled to grey for multi-class)."""
        if self.viz is None:
            return
        if probs.shape[0] == 1:
            shown = probs[0]
        else:
            shown = probs.argmax(0).float() / max(1, probs.shape[0] - 1)
        grey = label.float() / max(1, int(label.max()))
        tiles = torch.stack([image, grey.expand(3, -1, -1), shown.expand(3, -1, -1)])
        try:
            self.viz.images(tiles.clamp(0, 1), nrow=3, win="sample", env=self.env,
                            opts={"title": "image | label | prediction"})
        except Exception:
            self._lost()

    def _lost(self):
        print("notice: lost the visdom server; training goes on without live plots", file=sys.stderr)
        self.viz = None

