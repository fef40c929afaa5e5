"""A tiny extracted cache of synthetic videos and a random tiny MALT checkpoint for it."""
from pathlib import Path

import torch

from vidpipe.extractors.features import FeatureSettings
from vidpipe.malt.checkpoint import Checkpoint, save_checkpoint
from vidpipe.malt.config import Config, ModelConfig
from vidpipe.malt.model import MALT
from vidpipe.core.config import to_dict
from vidpipe.pipeline.extract import extract_folder
from vidpipe.store.cache import FeatureStore
from vidpipe.pipeline.synthetic import CLASSES, SyntheticSpec, generate_dataset

# Small and fast on a CPU: 12 fps in chunks of 3 (0.25 s steps), 64 px crops, resnet18s.
TINY_FEATURES = FeatureSettings(fps=12.0, chunk=3, resize=64, crop=64, rgb_backbone="resnet18",
                                flow_backbone="resnet18", flow_method="dis",
                                dis_preset="ultrafast", flow_fields=2, random_init=True)


def tiny_cache(root: Path, num_videos: int = 2, duration_s: float = 6.0):
    """(dataset, store) of `num_videos` synthetic videos extracted into root/cache."""
    data = generate_dataset(root / "data", SyntheticSpec(num_videos=num_videos, duration_s=duration_s,
                                                         test_fraction=0.5, seed=1), progress=False)
    summary = extract_folder(data.videos_dir, root / "cache", TINY_FEATURES, device="cpu",
                             progress=False)
    assert summary.ok, summary.report()
    return data, FeatureStore.open(root / "cache")


def tiny_checkpoint(path: Path, store: FeatureStore, seed: int = 0) -> Path:
    """A random tiny MALT for the store's features, saved as a checkpoint."""
    first = store.read(store.video_ids()[0])
    cfg = Config(model=ModelConfig(
        rgb_dim=first.rgb.shape[1], flow_dim=first.flow.shape[1], num_classes=len(CLASSES) + 1,
        d_model=16, num_heads=2, ffn_dim=24, long_memory_steps=16, long_memory_stride=4,
        short_memory_steps=4, sparse_k=3, num_branches=2, branch_queries=[4, 3],
        branch_layers=[1, 2]))
    torch.manual_seed(seed)
    model = MALT(cfg.model).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)  # clearly different probabilities per class
    save_checkpoint(Checkpoint(model_state=model.state_dict(), config=to_dict(cfg),
                               feature_settings=store.settings,
                               class_names=["background", *CLASSES]), path)
    return path


# --- a live source over a local socket ------------------------------------------------------

def to_mpegts(video: Path, out: Path) -> Path:
    """Re-encode `video` as an MPEG-TS file (H.264 without B-frames, a key frame every 6
    frames), the kind of stream a camera or `ffmpeg -f mpegts tcp://...` sends."""
    import av

    with av.open(str(video)) as source, av.open(str(out), "w", format="mpegts") as target:
        decoded = source.streams.video[0]
        stream = target.add_stream("libx264", rate=decoded.average_rate, options={"bf": "0", "g": "6"})
        stream.width, stream.height, stream.pix_fmt = decoded.width, decoded.height, "yuv420p"
        for frame in source.decode(decoded):
            frame.pict_type = 0   # let the encoder choose (not the source's frame types)
            target.mux(stream.encode(frame.reformat(format="yuv420p")))
        target.mux(stream.encode())
    return out


class LiveServer:
    """A TCP server on 127.0.0.1 serving one scripted connection per entry of `script`:
    (bytes to send, then "close" | "reset" | "stall"). After the script, connections are
    refused (the listening socket is closed). `url` is what a client opens."""

    def __init__(self, script: list[tuple[bytes, str]]):
        import socket
        import threading

        self.script = list(script)
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        import socket
        import struct
        import time

        for data, ending in self.script:
            while not self._stop.is_set():
                try:
                    client, _ = self._listener.accept()
                    break
                except socket.timeout:
                    continue
            else:
                break
            self.connections += 1
            try:  # paced like a live source, so the client has read it all before a reset
                for start in range(0, len(data), 4096):
                    client.sendall(data[start:start + 4096])
                    time.sleep(0.005)
            except OSError:  # the client went away first
                pass
            if ending == "stall":     # connected and silent until the test ends
                self._stop.wait()
            elif ending == "reset":   # RST instead of FIN: the client sees an error, not an end
                time.sleep(0.3)       # (unread bytes would be dropped with the RST)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        self._listener.close()


def free_port() -> int:
    """A local port nobody listens on (connecting is refused)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
