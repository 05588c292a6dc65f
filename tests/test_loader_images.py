"""The loader on encoded images of mixed sizes (issue #21): JPEG/PNG/WebP decode, the imagenet protocol, parallel
decode that keeps the batches, corrupt members, the GPU decode path's CPU fallback, and the served model applying
the loader's own test transform.

Shards are real WebDataset tars of real Fashion-MNIST images upsampled to 256-300 px JPEGs (the benchmark's own
writer, benchmarks/bench_loader.py, so the benchmark is exercised too), with a hand-made manifest.
"""
from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ksm_core import KSMNet, create_model, save_task
from ksm_core.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_geometry, imagenet_eval_transform, normalize
from pipeline.data import make_loader
from pipeline.data.decode import decode_on_device
from pipeline.data.loader import _cuda_device
from pipeline.data.transforms import ImageNetTransform
from pipeline.errors import PipelineError, ShardCorruptError, UnknownNameError

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_loader", REPO / "benchmarks" / "bench_loader.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_loader"] = module
    spec.loader.exec_module(module)
    return module


bl = _load_bench()
pytestmark = pytest.mark.skipif(not (bl.FASHION / bl.FASHION_FILES["test"][0]).is_file(),
                                reason="needs dataset-fashion-mnist")
CLASSES = bl.FASHION_CLASSES
N_TRAIN, N_TEST = 24, 12


def _encode(image: np.ndarray, fmt: str, h: int, w: int) -> bytes:
    """A 28x28 grey image upsampled to h x w, as the given PIL format (RGB, except "L" JPEG: a grey file)."""
    if fmt in ("jpg", "jpg-grey"):
        return bl.to_jpeg(image, h, w, mode="L" if fmt == "jpg-grey" else "RGB")
    big = Image.fromarray(image).resize((w, h), Image.BICUBIC).convert("RGB")
    out = io.BytesIO()
    big.save(out, {"png": "PNG", "webp": "WEBP"}[fmt], **({"lossless": True} if fmt == "webp" else {}))
    return out.getvalue()


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """Two tasks: "photos" (JPEGs of mixed sizes) and "mixed" (JPEG, grey JPEG, PNG, WebP, one large JPEG)."""
    root = tmp_path_factory.mktemp("shards")
    xtr, ytr = bl.read_fashion("train", N_TRAIN)
    xte, yte = bl.read_fashion("test", N_TEST)
    photos = bl.write_task(root, "s", "photos", {"train": (bl.jpeg_split(xtr, 0), ytr),
                                                 "test": (bl.jpeg_split(xte, 1), yte)}, CLASSES, max_samples=10)
    fmts = ["jpg", "jpg-grey", "png", "webp"] * (N_TEST // 4)
    sizes = [(256 + 11 * i, 300 - 7 * i) for i in range(N_TEST)]
    sizes[1] = (1200, 1000)  # a large JPEG: its crop shrinks >= 2x, so it is decoded at a reduced DCT scale
    blobs = [_encode(im, f, h, w) for im, f, (h, w) in zip(xte, fmts, sizes)]
    exts = [f.split("-")[0] for f in fmts]
    mixed = bl.write_task(root, "s", "mixed", {"train": (blobs, yte), "test": (blobs, yte)}, CLASSES, ext=exts)
    return bl.manifest_of(root, "s", [photos, mixed]), {"test": (xte, yte), "blobs": blobs, "fmts": fmts}


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("task", ["photos", "mixed"])
def test_imagenet_transform_gives_224_px_float_batches_from_images_of_any_size_and_format(stream, task):
    m, raw = stream
    for split in ("train", "test"):
        loader = make_loader(m, task, split, batch_size=5, transform="imagenet")
        batches = list(loader)
        assert [len(y) for _, y in batches][:-1] == [5] * (len(batches) - 1) and len(loader) == len(batches)
        for x, y in batches:
            assert x.shape == (len(y), 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
        x, y = _epoch(loader)
        lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert (x.amin((0, 2, 3)) >= lo - 1e-5).all() and (x.amax((0, 2, 3)) <= hi + 1e-5).all()
        assert sorted(y.tolist()) == sorted(raw["test"][1].tolist() if split == "test" or task == "mixed"
                                            else bl.read_fashion("train", N_TRAIN)[1].tolist())
    # test batches are in shard order, each image decoded at full size, Resize(256) + CenterCrop(224), ImageNet stats
    x, y = _epoch(make_loader(m, task, "test", batch_size=7, transform="imagenet"))
    np.testing.assert_array_equal(y.numpy(), raw["test"][1])
    info = m.task(task)
    blobs = raw["blobs"] if task == "mixed" else None
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for i in range(len(y)):
        if blobs is None:
            break
        with Image.open(io.BytesIO(blobs[i])) as im:
            pixels = np.array(im.convert("RGB"))
        want = normalize(eval_geometry(torch.from_numpy(pixels).permute(2, 0, 1))[None], mean, std, 3)
        assert torch.equal(x[i : i + 1], want), (i, raw["fmts"][i])
    assert info.image_format == ("mixed" if task == "mixed" else "jpg")


def test_cifar_transform_takes_mixed_sizes_too(stream):
    """An encoded task under the cifar protocol: each image resized to 32 with the batch's own crop draws."""
    m, _ = stream
    x, y = next(iter(make_loader(m, "photos", "train", batch_size=8, seed=2)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_a_large_training_jpeg_is_decoded_at_a_reduced_scale(stream, monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: calls.append((self.size, size)) or real(self, mode, size))
    m, _ = stream
    train = make_loader(m, "mixed", "train", batch_size=4, transform="imagenet", seed=0)
    for _ in range(4):  # a crop of the large image shrinks >= 2x in some epochs, not in all
        x, _ = _epoch(train)
        assert x.shape[1:] == (3, 224, 224)
    assert calls and all(full == (1000, 1200) for full, _ in calls)  # only the 1000 x 1200 JPEG shrinks >= 2x
    seen = len(calls)
    _epoch(make_loader(m, "mixed", "test", batch_size=4, transform="imagenet"))
    assert len(calls) == seen  # test images are decoded at full scale: the served model gets full-size pixels


# ------------------------------------------------------------------------------------------ parallel decode
@pytest.mark.parametrize("transform, task", [("imagenet", "photos"), ("imagenet", "mixed"), ("cifar", "photos")])
def test_decode_workers_change_nothing_in_the_batches(stream, transform, task):
    m, _ = stream
    for split in ("train", "test"):
        epochs = {}
        for workers in (0, 1, 2):
            loader = make_loader(m, task, split, batch_size=5, seed=4, transform=transform, decode_workers=workers,
                                 shuffle_buffer=8)
            epochs[workers] = [list(loader) for _ in range(2)]
        for workers in (1, 2):
            for e0, e1 in zip(epochs[0], epochs[workers]):
                assert len(e0) == len(e1)
                assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, e1)), workers
        if split == "train":  # epochs differ (order and crops), and replaying epoch 0 gives it back
            assert not torch.equal(_epoch(epochs[2][0])[0], _epoch(epochs[2][1])[0])


def test_a_training_image_gets_its_crop_from_its_key_not_from_its_batch(stream):
    """The same sample, epoch and seed gives the same crop whatever the batch size (its neighbours, its worker)."""
    m, _ = stream
    by_key = {}
    for bs in (3, 8):
        x, y = _epoch(make_loader(m, "photos", "train", batch_size=bs, seed=9, transform="imagenet", shuffle_buffer=1,
                                  decode_workers=2))
        by_key[bs] = x
    assert torch.equal(by_key[3], by_key[8])


# ------------------------------------------------------------------------------------------------ corrupt
def _with_bad_member(tmp_path: Path, stream_m, bad: int) -> tuple:
    """The "photos" test split rewritten with sample ``bad``'s JPEG truncated (the shard's sha256 updated, so the
    shard checks out and the sample alone is bad)."""
    xte, yte = bl.read_fashion("test", N_TEST)
    blobs = bl.jpeg_split(xte, 1)
    blobs[bad] = blobs[bad][:200]
    info = bl.write_task(tmp_path, "s", "photos", {"train": (blobs, yte), "test": (blobs, yte)}, CLASSES,
                         max_samples=10)
    return bl.manifest_of(tmp_path, "s", [info]), info


def test_a_corrupt_jpeg_member_is_named_under_fail_and_counted_under_skip(stream, tmp_path):
    m, info = _with_bad_member(tmp_path, stream[0], bad=3)
    shard = m.url(info.shards["test"][0])
    for workers in (0, 2):
        with pytest.raises(ShardCorruptError) as err:
            list(make_loader(m, "photos", "test", batch_size=4, transform="imagenet", decode_workers=workers))
        msg = str(err.value)
        assert "sample 0000003" in msg and shard in msg and "mode=shards" in msg, msg
        skipping = make_loader(m, "photos", "test", batch_size=4, transform="imagenet", on_corrupt="skip",
                               decode_workers=workers)
        x, y = _epoch(skipping)
        assert len(y) == N_TEST - 1 and skipping.skipped == 1
        assert [len(b) for _, b in skipping] == [4, 4, 3]  # batches are refilled from the next samples


def test_a_member_of_another_format_under_an_image_extension_is_refused_not_parsed(tmp_path):
    """A .jpg entry holding a PNG (or anything else PIL could read) is opened by the JPEG reader only."""
    xte, yte = bl.read_fashion("test", 4)
    png = io.BytesIO()
    Image.fromarray(xte[0]).save(png, "PNG")
    blobs = [png.getvalue()] + bl.jpeg_split(xte[1:], 0)
    info = bl.write_task(tmp_path, "s", "photos", {"train": (blobs, yte), "test": (blobs, yte)}, CLASSES)
    m = bl.manifest_of(tmp_path, "s", [info])
    with pytest.raises(ShardCorruptError, match="sample 0000000"):
        list(make_loader(m, "photos", "test", transform="imagenet"))


# ----------------------------------------------------------------------------------------- device decode
def test_the_device_decode_path_runs_on_the_cpu_and_falls_back_per_image(stream, tmp_path):
    """No GPU here: the decode_jpeg batch path with device=cpu. A bad JPEG fails the batch call, the others are
    decoded one by one; non-JPEG members go through PIL; only what no decoder reads comes back an exception."""
    m, raw = stream
    assert _cuda_device("cpu") is None and make_loader(m, "photos", "train", device="cpu").decode_device is None
    if not torch.cuda.is_available():
        assert _cuda_device("auto") is None
    assert make_loader(m, "photos", "train", device="cuda").decode_device is None  # cifar: never on the device
    samples = [{"__key__": f"{i:07d}", ext: blob, "cls": b"0"}
               for i, (ext, blob) in enumerate(zip([f.split("-")[0] for f in raw["fmts"]], raw["blobs"]))]
    samples[4] = {**samples[4], "jpg": samples[4]["jpg"][:150]}
    out = decode_on_device(samples, torch.device("cpu"), 3)
    assert isinstance(out[4], Exception)
    for i, image in enumerate(out):
        if i == 4:
            continue
        with Image.open(io.BytesIO(raw["blobs"][i])) as im:
            want = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert image.shape == want.shape and image.dtype == torch.uint8
        assert (image.int() - want.int()).abs().float().mean() < 2.0  # libjpeg builds may round differently
    # the whole device path, forced onto the CPU: same samples, same order, 224-px batches
    for split in ("train", "test"):
        on_device = make_loader(m, "photos", split, batch_size=5, transform="imagenet", seed=1)
        on_device.decode_device = torch.device("cpu")
        plain = make_loader(m, "photos", split, batch_size=5, transform="imagenet", seed=1)
        (xd, yd), (xp, yp) = _epoch(on_device), _epoch(plain)
        assert xd.shape == xp.shape == (len(yp), 3, 224, 224) and torch.equal(yd, yp)


# ------------------------------------------------------------------------------------------- served model
def test_the_served_model_applies_the_loaders_test_transform(stream, tmp_path):
    """export records the task's transform; the served model applies it to raw uint8 images of any size: the
    same pixels as the loader's test batches, and the same answers as the network on those batches."""
    from pipeline.export import served_tasks
    from pipeline.served import FORMAT, SPEC_FILE, BadRequest, MultiTaskModel

    m, raw = stream
    run = lambda rid: SimpleNamespace(info=SimpleNamespace(run_id=rid), data=SimpleNamespace(metrics={}))  # noqa: E731
    specs = served_tasks(m, run("bb"), {"mixed": run("t")}, transform="imagenet")
    assert [(d["transform"], d["image_size"], d["resize_size"]) for d in specs] == [("imagenet", 224, 256)] * 2
    assert specs[1]["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert specs[1]["std"] == pytest.approx(list(IMAGENET_STD))
    assert served_tasks(m, run("bb"), {})[0]["transform"] == "cifar"

    x, y = _epoch(make_loader(m, "mixed", "test", batch_size=4, transform="imagenet"))
    mean, std = (torch.tensor(specs[1][k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    pixels = []
    for i, blob in enumerate(raw["blobs"]):
        with Image.open(io.BytesIO(blob)) as im:
            pixels.append(np.array(im.convert("RGB")))  # what a client sends: the full-size decoded image
        got = imagenet_eval_transform(torch.from_numpy(pixels[-1])[None], mean, std, 224, 256, 3)
        assert torch.equal(got, x[i : i + 1]), i

    root = tmp_path / "ksm"
    (root / "tasks").mkdir(parents=True)
    torch.manual_seed(0)
    bb = create_model("resnet18", num_classes=len(CLASSES))
    net = KSMNet.from_backbone(bb)
    t = net.add_task(len(CLASSES), method="ksm", name="mixed")
    with torch.no_grad():
        for p in net.heads.tasks[str(t)].parameters():
            p.normal_()
    save_task(net, t, root / "tasks" / "mixed.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(root / "backbone.safetensors"))
    spec = {"format": FORMAT, "backbone": "backbone.safetensors", "backbone_fingerprint": net.backbone_fingerprint,
            "model": {"name": "resnet18", "num_classes": len(CLASSES)}, "tasks": specs}
    (root / SPEC_FILE).write_text(__import__("json").dumps(spec))
    model = MultiTaskModel()
    model.load_context(SimpleNamespace(artifacts={"ksm": str(root)}, model_config={}))
    net.eval().set_task(t)
    with torch.inference_mode():
        for i in range(2):  # one request per image: a request's images share one size
            got = model.predict(None, {"task": np.array(["mixed"]), "image": pixels[i][None]})
            assert got.tolist() == net(x[i : i + 1]).argmax(1).tolist(), i
    with pytest.raises(BadRequest, match="of any size"):
        model.predict(None, {"task": np.array(["mixed"]), "image": np.zeros((1, 300, 280, 4), np.uint8)})


# -------------------------------------------------------------------------------------------- validation
def test_an_unknown_transform_is_refused_naming_the_valid_ones(stream, tmp_path):
    m, _ = stream
    with pytest.raises(UnknownNameError, match=r"unknown transform 'imagenet224'; valid: 'cifar', 'imagenet'"):
        make_loader(m, "photos", "train", transform="imagenet224")
    with pytest.raises(Exception, match="3-channel"):
        ImageNetTransform(channels=1, train=True, flip=False)
    from hydra import compose, initialize_config_dir

    from pipeline.config import resolve
    from pipeline.validation import validate

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        rc = {over: resolve(compose("config", overrides=[f"paths.root={tmp_path}", *over.split()]))
              for over in ("data.transform=imagenet model=resnet18", "data.transform=imagnet model=resnet18",
                           "data.transform=imagenet", "")}
    assert rc[""].data.transform == "cifar"  # the default: the 32-px protocol, as before
    validate(rc["data.transform=imagenet model=resnet18"])
    with pytest.raises(PipelineError) as err:
        validate(rc["data.transform=imagnet model=resnet18"])
    assert "data.transform='imagnet'" in str(err.value) and "valid: cifar, imagenet" in str(err.value)
    with pytest.raises(PipelineError, match="model vgg16_bn_cifar takes 32 x 32 only: use model=resnet18"):
        validate(rc["data.transform=imagenet"])  # the default model's classifier cannot take 224 px
