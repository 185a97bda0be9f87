import io

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_params
from tasks.preprocess import decode_rgb, load_image, PreprocessingCard

CARD = PreprocessingCard(input_size=(224, 224), resize_size=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def test_features_are_computed_once_and_reused_while_the_key_holds(imagefolder, workdir):
    params = tiny_params(imagefolder)
    workdir.prepare(params)
    first = workdir.features_(params)
    mtime = (workdir.features / "x_train.npy").stat().st_mtime_ns
    second = workdir.features_(params)
    assert not first.cached and second.cached and second.key == first.key
    assert (workdir.features / "x_train.npy").stat().st_mtime_ns == mtime
    # New data -> new key -> recomputed.
    (imagefolder / "circles" / "circles_00.png").unlink()
    workdir.prepare(params)
    third = workdir.features_(params)
    assert not third.cached and third.key != first.key


def test_torch_and_onnxruntime_engines_agree(imagefolder, workdir, tmp_path):
    params = tiny_params(imagefolder)
    workdir.prepare(params)
    a = workdir.features_(params)
    ort = workdir.layout.feature_cache().load()
    p_torch = params.model_copy(update={"features": params.features.model_copy(update={"engine": "torch"})})
    t = workdir.features_(p_torch, force=True)
    assert a.engine == "onnxruntime" and t.engine == "torch" and not t.cached
    a, b = ort, workdir.layout.feature_cache().load()
    for k in a:
        assert np.abs(a[k] - b[k]).max() < 1e-4


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_any_mode_becomes_uint8_rgb_at_input_size(mode):
    img = Image.new("RGB", (300, 200), (200, 30, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = load_image(image_bytes(img, fmt), CARD)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (400, 300), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 200, 300))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: white ends up on top
    out = load_image(image_bytes(img, "JPEG", exif=exif), CARD)
    assert out[:50].mean() > 200 and out[-50:].mean() < 50


def test_jpeg_draft_decode_matches_a_full_decode():
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (60, 80, 3)), np.ones((32, 32, 1))).astype(np.uint8)  # 1920x2560
    data = image_bytes(Image.fromarray(base), "JPEG", quality=95)
    fast = load_image(data, CARD).astype(float)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    from tasks.preprocess import resize_center_crop

    slow = np.asarray(resize_center_crop(full, 256, (224, 224), "bicubic")).astype(float)
    assert decode_rgb(data, 256).size[0] < 2560  # draft really decoded at reduced size
    assert np.abs(fast - slow).mean() < 3.0


def test_resize_then_crop_geometry():
    # A 512x256 image: shorter side -> 256, so width 512 -> centre 224 crop of the middle.
    arr = np.zeros((256, 512, 3), np.uint8)
    arr[:, 256 - 50 : 256 + 50] = 255  # a vertical white band in the middle
    out = load_image(image_bytes(Image.fromarray(arr), "PNG"), CARD)
    assert out[:, 112].mean() > 250 and out[:, 5].mean() < 5


def gradient16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (300, 1))  # dark to light, left to right


@pytest.mark.parametrize("fmt,mode", [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B"), ("TIFF", "I"), ("PPM", "I;16")])
def test_16_bit_greyscale_is_rescaled_not_clipped_to_white(fmt, mode):
    arr = gradient16()
    if mode == "I;16B":
        img = Image.frombytes(mode, arr.shape[::-1], arr.astype(">u2").tobytes())
    else:
        img = Image.fromarray(arr.astype(np.int32) if mode == "I" else arr)
    data = image_bytes(img, fmt)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I")  # really decoded as high bit depth
    out = load_image(data, CARD)
    assert out.dtype == np.uint8 and abs(out.mean() - 127.5) < 3  # clipped, it was ~254
    eight_bit = load_image(image_bytes(Image.fromarray((arr >> 8).astype(np.uint8)), "PNG"), CARD)
    assert np.abs(out.astype(int) - eight_bit).max() <= 1  # the top byte: as if saved at 8 bits


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I"])
def test_8_bit_images_decode_as_before_the_bit_depth_rescale(mode):
    from tasks.preprocess import resize_center_crop, to_8bit

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).convert(mode if mode != "I" else "L")
    img = img.convert("I") if mode == "I" else img  # "I" holding 0..255: already 8-bit values
    assert to_8bit(img) is img
    data = image_bytes(img, "TIFF" if mode == "I" else "PNG")
    before = Image.open(io.BytesIO(data))  # the loader before 16-bit support: a plain convert("RGB")
    before = before.convert("RGBA").convert("RGB") if before.mode == "P" else before.convert("RGB")
    expected = np.asarray(resize_center_crop(before, CARD.resize_size, CARD.input_size, CARD.interpolation))
    assert np.array_equal(load_image(data, CARD), expected)


def test_multi_layer_and_flip_features_travel_with_the_card_into_the_exported_model(imagefolder, tmp_path):
    """classification.features.layers: multi + .flip: the card records them, features.onnx and the exported
    classifier compute them (parity gate), the cache key changes, and flipped images give the same vector."""
    import onnxruntime as ort

    from tasks import backbone, data, export, features, train
    from tasks.config import parse_params
    from tasks.layout import Layout

    raw = {"data": {"dataset": "imagefolder", "root": str(imagefolder), "val_fraction": 0.25, "test_fraction": 0.25},
           "features": {"batch_size": 8}}
    plain, layout = parse_params(raw), Layout(tmp_path)
    data.run(plain, layout)
    backbone.run(plain, layout)
    key_last = features.run(plain, layout).key
    params = parse_params({**raw, "classification": {"features": {"layers": "multi", "flip": True}}})
    card = backbone.run(params, layout).card
    assert card.extra["layers"] == "multi" and card.extra["flip"] is True
    assert card.feature_dim == 16 + 24 + 40 + 112 + 320 + 1280  # Lite0's 5 stages' pooled maps, then its last features
    f = features.run(params, layout)
    assert not f.cached and f.key != key_last
    assert layout.feature_cache().load()["x_train"].shape[1] == card.feature_dim

    session = ort.InferenceSession(str(layout.features_onnx), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).integers(0, 256, (2, *card.input_size, 3), dtype=np.uint8)
    a, b = (session.run(["features"], {"images": x})[0] for x in (batch, np.ascontiguousarray(batch[:, :, ::-1])))
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())  # the mean over an image and its mirror

    train.run(params, layout)
    result = export.run(params, layout)
    assert result.parity["passed"]
    out = ort.InferenceSession(str(layout.model_onnx), providers=["CPUExecutionProvider"])
    assert out.get_outputs()[0].shape[-1] == len(layout.dataset().classes)


def test_pooled_feature_options_are_not_params_of_dense_tasks():
    from tasks.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match="detection.features.layers"):
        parse_params({"task": "detection", "data": {"dataset": "voc"}, "detection": {"features": {"layers": "multi"}}})


def test_multi_layer_features_of_a_resnet_are_its_stages_then_its_pooled_features():
    import torch

    from tasks.network import build_network
    from tasks.pooled import FeatureExtractor

    net = build_network("torchvision:resnet18").eval()  # untrained weights: only the shapes and the last part matter
    card = PreprocessingCard(input_size=(64, 64), resize_size=64, interpolation="bilinear", mean=(0.5,) * 3,
                             std=(0.5,) * 3, extra={"layers": "multi", "flip": False})
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        multi = FeatureExtractor(net, card)(pixels)
        last = FeatureExtractor(net, PreprocessingCard(**{**card.to_dict(), "extra": {}}))(pixels)
    assert multi.shape == (2, 64 + 128 + 256 + 512)
    torch.testing.assert_close(multi[:, -512:], last)


@pytest.mark.parametrize("split", ["train", "test"])  # train: the gap's subsample (the tap); test: the main runs
def test_an_image_broken_after_prepare_stops_the_pass_naming_it_and_keeps_the_last_good_features(imagefolder, workdir,
                                                                                                   split):
    from tasks.preprocess import ImageDecodeError

    params = tiny_params(imagefolder)
    workdir.prepare(params)
    workdir.features_(params)
    before = workdir.layout.feature_cache().load()
    item = workdir.layout.dataset().split(split)[-1]
    broken = workdir.layout.dataset().resolve(item)
    broken.write_bytes(broken.read_bytes()[:40])  # truncated: its header survives, its pixels do not
    with pytest.raises(ImageDecodeError, match=broken.name):
        workdir.features_(params, force=True)
    after = workdir.layout.feature_cache().load()
    assert sorted(after) == sorted(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
