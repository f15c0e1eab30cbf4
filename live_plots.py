"""Optional live curves and sample predictions in a visdom server, never in training's way.

Everything that talks to the server runs on a background thread, each request with a timeout: a server
that is slow, suspended (Ctrl-Z, SIGSTOP) or behind a stalled SSH tunnel costs training nothing. Updates
wait in a short queue; when it is full (the server cannot keep up) the newest are dropped.
"""
import logging
import queue
import sys
import threading

import torch

REQUEST_TIMEOUT = 2.0     # seconds a single request to the server may take
QUEUE_LENGTH = 64         # updates waiting for the server; more are dropped
CLOSE_WAIT = 5.0          # seconds close() waits for the queue to drain at the end of training


class VisdomLogger:
    """Loss / LR curves and a sample (image, label, prediction) in a visdom environment.

    When no server answers, says so once and turns into a no-op, so training never depends on it.
    """

    def __init__(self, server, port, env, enabled=True):
        self.server, self.port, self.env = server, port, env
        self.active = enabled
        self.updates = queue.Queue(maxsize=QUEUE_LENGTH)
        self.worker, self.said, self.lock = None, False, threading.Lock()
        if enabled:
            self.worker = threading.Thread(target=self._run, name="visdom", daemon=True)
            self.worker.start()

    def scalar(self, window, step, value):
        self._put(("line", window, step, value))

    def sample(self, image, label, probs):
        """Image, label and prediction side by side (the prediction is the foreground probability,
        or the argmax class scaled to grey for multi-class)."""
        if not self.active:
            return
        if probs.shape[0] == 1:
            shown = probs[0]
        else:
            shown = probs.argmax(0).float() / max(1, probs.shape[0] - 1)
        grey = label.float() / max(1, int(label.max()))
        tiles = torch.stack([image, grey.expand(3, -1, -1), shown.expand(3, -1, -1)]).clamp(0, 1)
        self._put(("images", tiles))

    def close(self):
        """Let the queued updates go out, waiting at most CLOSE_WAIT seconds."""
        if self.worker is not None and self.worker.is_alive():
            try:
                self.updates.put(None, timeout=CLOSE_WAIT)
            except queue.Full:
                pass
            self.worker.join(timeout=CLOSE_WAIT)
            if self.worker.is_alive():  # a server that accepts connections and never answers
                self.active = False
                self._notice(f"notice: no visdom server answered at {self.server}:{self.port} (it accepts "
                             f"connections but does not reply); live plots were skipped")

    def _notice(self, text):
        """One notice per run, from whichever thread gets there first."""
        with self.lock:
            if not self.said:
                self.said = True
                print(text, file=sys.stderr)

    def _put(self, update):
        if not self.active:
            return
        try:
            self.updates.put_nowait(update)
        except queue.Full:
            pass  # the server is behind: drop this update rather than wait

    # --- the background thread ----------------------------------------------------------------

    def _run(self):
        viz = self._connect()
        if viz is None:
            self.active = False
            self._notice(f"notice: no visdom server at {self.server}:{self.port}; training goes on without live "
                         f"plots (start one with `python -m visdom.server`)")
            return
        while True:
            update = self.updates.get()
            if update is None:
                return
            try:
                self._send(viz, update)
            except Exception:  # visdom raises bare ConnectionErrors of several kinds
                self.active = False
                self._notice("notice: lost the visdom server; training goes on without live plots")
                return

    def _connect(self):
        try:
            import requests
            from visdom import Visdom

            class TimedSession(requests.Session):
                def request(self, *args, **kwargs):
                    kwargs.setdefault("timeout", REQUEST_TIMEOUT)
                    return super().request(*args, **kwargs)

            logging.getLogger("visdom").setLevel(logging.CRITICAL)
            viz = Visdom(server=self.server, port=self.port, env=self.env, raise_exceptions=True,
                         use_incoming_socket=False)
            viz._session = TimedSession()  # visdom's own session posts without a timeout
            return viz if viz.check_connection(timeout_seconds=REQUEST_TIMEOUT) else None
        except Exception:
            return None

    def _send(self, viz, update):
        if update[0] == "line":
            _, window, step, value = update
            append = "append" if viz.win_exists(window, env=self.env) else None
            viz.line(X=[step], Y=[value], win=window, env=self.env, update=append,
                     opts={"title": window, "xlabel": "step"})
        else:
            viz.images(update[1], nrow=3, win="sample", env=self.env, opts={"title": "image | label | prediction"})
