"""Run by the SIGKILL test: ``python tests/train/pause_worker.py <step> <config> [key=value ...]`` trains with the
save of checkpoint ``<step>`` pausing once its weights are written (``<run_dir>/saving.marker`` tells the test),
so the test can kill the process in the middle of the save."""
import sys
import time
from pathlib import Path

from hope.train import checkpoint, load_config, train


def main():
    step, config, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cfg = load_config(config, overrides)
    save_weights = checkpoint._st_save_model

    def save_then_pause(model, filename, *args, **kwargs):
        save_weights(model, filename, *args, **kwargs)
        if Path(filename).parent.name.startswith(f".tmp-step_{step}-"):
            (Path(cfg.run_dir) / "saving.marker").write_text(str(step))
            time.sleep(120)

    checkpoint._st_save_model = save_then_pause
    train(cfg)


if __name__ == "__main__":
    main()
