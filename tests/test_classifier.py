"""The evaluation classifier: a small judge CNN trained on the dataset's images, and torchvision models
filled from local state dicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from neuroimagen.errors import ConfigError, DataError
from neuroimagen.frozen.judge import augment_batch, judge_cache_key, train_judge
from neuroimagen.models.classifier import (Classifier, JudgeCNN, load_classifier, load_is_network,
                                           load_torchvision_classifier, save_classifier)

SIZE = 32


def shapes_dataset(per_class: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes = {red, blue} x {square, disc} at random positions and sizes on noisy grey backgrounds.

    Returns images (4 * per_class, 3, size, size) in [0, 1] and labels (4 * per_class,) int64.
    """
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[0.9, 0.15, 0.1], [0.1, 0.3, 0.9]])
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images, labels = [], []
    for k in range(4):
        colour, disc = colours[k // 2], k % 2 == 1
        for _ in range(per_class):
            img = 0.3 + 0.4 * torch.rand(1, generator=g) + 0.08 * torch.randn(3, size, size, generator=g)
            r = float(4 + 3 * torch.rand(1, generator=g))
            cy, cx = (8 + (size - 16) * torch.rand(2, generator=g)).tolist()
            if disc:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (1.1 * r) ** 2
            else:
                mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            shade = colour.view(3, 1, 1) * (0.85 + 0.3 * torch.rand(1, generator=g))
            images.append(torch.where(mask, shade, img).clamp(0, 1))
            labels.append(k)
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train on one intra-op thread: as fast as two on an idle 2-core machine for this tiny CNN, and several
    times faster when another process is busy on the same cores (OpenMP threads then spin at barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    x, y = shapes_dataset(20, seed=0)
    xv, yv = shapes_dataset(10, seed=1)
    return x, y, xv, yv


@pytest.fixture(scope="module")
def judge(data) -> Classifier:
    x, y, xv, yv = data
    return train_judge(x, y, 4, val_images=xv, val_labels=yv, seed=0,
                       class_names=["red square", "red disc", "blue square", "blue disc"])


# ---------------------------------------------------------------------------------------------------------------
# judge


def test_judge_learns_the_classes_and_records_its_accuracy(judge, data):
    _, _, xv, yv = data
    acc = float((judge.probs(xv).argmax(1) == yv).float().mean())
    assert acc >= 0.9
    desc = judge.describe()
    json.dumps(desc)  # json-able
    assert desc["kind"] == "judge" and desc["num_classes"] == 4 and desc["input_size"] == SIZE
    assert desc["identity"] == judge.identity and judge.identity.startswith("judge-cnn-")
    assert desc["val_accuracy"] == pytest.approx(acc)
    assert desc["train_accuracy"] >= 0.9
    assert desc["n_train"] == 80 and desc["steps"] == 300
    assert judge.class_names[3] == "blue disc"


def test_judge_with_shuffled_labels_stays_near_chance(data):
    x, y, xv, yv = data
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(5))
    clf = train_judge(x, y[perm], 4, val_images=xv, val_labels=yv, seed=0)
    assert clf.describe()["val_accuracy"] <= 0.5


def test_probs_shape_rows_and_other_resolutions(judge, data):
    x = data[2][:6]
    p = judge.probs(x, batch_size=4)
    assert p.shape == (6, 4) and p.dtype == torch.float32 and p.device.type == "cpu"
    assert torch.allclose(p.sum(1), torch.ones(6), atol=1e-5)
    big = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    p48 = judge.probs(big)
    assert p48.shape == (6, 4) and torch.allclose(p48.sum(1), torch.ones(6), atol=1e-5)
    assert (p48.argmax(1) == p.argmax(1)).float().mean() >= 0.8  # same content, other resolution
    assert judge.probs(x[:0]).shape == (0, 4)
    assert torch.allclose(judge.probs(x, batch_size=1), p, atol=1e-6)
    assert not judge.module.training


def test_probs_rejects_bad_images(judge):
    with pytest.raises(DataError, match="images"):
        judge.probs(torch.rand(2, 1, 32, 32))
    with pytest.raises(DataError, match="float"):
        judge.probs(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_training_is_deterministic_per_seed(data):
    x, y, _, _ = data
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = train_judge(x, y, 4, steps=15, seed=7)
    assert torch.equal(torch.rand(3), before)  # global RNG state restored
    b = train_judge(x, y, 4, steps=15, seed=7)
    c = train_judge(x, y, 4, steps=15, seed=8)
    assert torch.equal(a.probs(x), b.probs(x))
    assert a.identity == b.identity != c.identity
    assert not torch.equal(a.probs(x), c.probs(x))


def test_train_judge_errors(data):
    x, y, xv, yv = data
    with pytest.raises(DataError, match="labels"):
        train_judge(x, y + 4, 4, steps=1)
    with pytest.raises(DataError, match="labels"):
        train_judge(x, y[:-1], 4, steps=1)
    with pytest.raises(ConfigError, match="val_images/val_labels"):
        train_judge(x, y, 4, val_images=xv, steps=1)
    with pytest.raises(ConfigError, match="class_names"):
        train_judge(x, y, 4, steps=1, class_names=["a", "b"])
    with pytest.raises(ConfigError, match="steps"):
        train_judge(x, y, 4, steps=0)


def test_progress_bar_and_tiny_batches(data, capsys):
    x, y, _, _ = data
    clf = train_judge(x[::10], y[::10], 4, steps=3, batch_size=64, progress=True)  # batch > N
    assert clf.describe()["steps"] == 3


def test_augmentation_keeps_shape_range_and_is_seeded():
    x = torch.rand(5, 3, SIZE, SIZE)
    a = augment_batch(x, torch.Generator().manual_seed(1), blur_p=1.0)
    b = augment_batch(x, torch.Generator().manual_seed(1), blur_p=1.0)
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.allclose(a, x, atol=1e-2)


def test_judge_cnn_shapes():
    net = JudgeCNN(7, width=8)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ConfigError, match="num_classes"):
        JudgeCNN(1)


# ---------------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_roundtrip(judge, data, tmp_path):
    x = data[2]
    out = save_classifier(judge, tmp_path / "judge")
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "weights.pt"]
    doc = json.loads((out / "classifier.json").read_text())
    assert doc["builder"] == "judge_cnn" and doc["kwargs"] == {"num_classes": 4, "width": 16}
    assert len(doc["mean"]) == 3 and len(doc["std"]) == 3
    back = load_classifier(out)
    assert back.identity == judge.identity and back.class_names == judge.class_names
    assert back.describe() == judge.describe()
    assert torch.equal(back.probs(x), judge.probs(x))
    save_classifier(judge, out)  # replacing an existing cache entry is allowed by default
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_load_classifier_errors(judge, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_classifier(missing)
    out = save_classifier(judge, tmp_path / "judge")
    weights = out / "weights.pt"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="weights.pt"):
        load_classifier(out)
    state = {k: v.clone() for k, v in judge.module.state_dict().items()}
    state["head.bias"] += 1.0
    torch.save(state, weights)
    with pytest.raises(DataError, match="identity"):
        load_classifier(out)
    weights.unlink()
    with pytest.raises(DataError, match=str(weights)):
        load_classifier(out)
    (out / "classifier.json").write_text("{not json")
    with pytest.raises(DataError, match="classifier.json"):
        load_classifier(out)


def test_only_judges_can_be_saved(tmp_path):
    clf = Classifier(torch.nn.Linear(3, 2), num_classes=2, input_size=1, identity="x", kind="torchvision")
    with pytest.raises(ConfigError, match="only judge"):
        save_classifier(clf, tmp_path / "c")


def test_judge_cache_key():
    k = judge_cache_key("things:train:abc", steps=300, width=16)
    assert len(k) == 16 and int(k, 16) >= 0
    assert k == judge_cache_key("things:train:abc", width=16, steps=300)
    assert k != judge_cache_key("things:train:abc", steps=301, width=16)
    assert k != judge_cache_key("things:train:abd", steps=300, width=16)


# ---------------------------------------------------------------------------------------------------------------
# torchvision classifiers from local state dicts


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    from torchvision.models import get_model

    torch.manual_seed(0)
    net = get_model("mobilenet_v3_small", weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "mobilenet.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_torchvision_classifier_matches_the_module(mobilenet_weights):
    path, net = mobilenet_weights
    clf = load_torchvision_classifier("mobilenet_v3_small", str(path))
    assert clf.kind == "torchvision" and clf.num_classes == 1000 and clf.input_size == 224
    assert clf.identity == f"torchvision:mobilenet_v3_small@{path.resolve()}"
    x = torch.rand(3, 3, 64, 64)
    p = clf.probs(x)
    assert p.shape == (3, 1000) and p.dtype == torch.float32
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        ref = torch.softmax(net(clf.preprocess(x)), dim=1)
        ref2 = torch.softmax(clf.module(clf.preprocess(x)), dim=1)
    assert torch.allclose(p, ref, atol=1e-6) and torch.allclose(p, ref2, atol=1e-6)
    mean_image = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 224, 224)
    assert torch.allclose(clf.preprocess(mean_image), torch.zeros(1, 3, 224, 224), atol=1e-6)  # ImageNet mean/std
    assert clf.preprocess(x).shape == (3, 3, 224, 224)
    json.dumps(clf.describe())
    assert clf.to("cpu") is clf


def test_torchvision_classifier_errors(mobilenet_weights, tmp_path):
    path, _ = mobilenet_weights
    missing = tmp_path / "missing.pth"
    with pytest.raises(ConfigError, match=str(missing)):
        load_torchvision_classifier("resnet18", str(missing))
    wrong = tmp_path / "judge.pth"
    torch.save(JudgeCNN(4).state_dict(), wrong)
    with pytest.raises(ConfigError, match=f"{wrong}.*does not fit"):
        load_torchvision_classifier("mobilenet_v3_small", str(wrong))
    with pytest.raises(ConfigError, match=f"{path}.*does not fit"):
        load_torchvision_classifier("resnet18", str(path))  # another architecture's weights
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=str(truncated)):
        load_torchvision_classifier("mobilenet_v3_small", str(truncated))
    with pytest.raises(ConfigError, match="unknown torchvision architecture"):
        load_torchvision_classifier("no_such_net", str(path))


def test_torchvision_classifier_with_another_head(tmp_path):
    from torchvision.models import get_model

    net = get_model("mobilenet_v3_small", weights=None, num_classes=10).eval()
    path = tmp_path / "m10.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    clf = load_torchvision_classifier("mobilenet_v3_small", path, class_names=[str(i) for i in range(10)])
    assert clf.num_classes == 10 and clf.probs(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight torchvision Inception-v3 state dict in the IMAGENET1K_V1 layout (AuxLogits head included,
    as torchvision's pretrained file has it), built and saved once for this module (~100 MB)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    path = tmp_path_factory.mktemp("inception") / "inception_v3.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_inception_v3_uses_299_px_and_the_main_logits(inception_weights):
    path, net = inception_weights
    clf = load_torchvision_classifier("inception_v3", path)
    assert clf.input_size == 299 and clf.num_classes == 1000
    assert clf.module.transform_input  # torchvision's pretrained Inception-v3 expects it
    x = torch.rand(2, 3, 64, 64)
    p = clf.probs(x)
    net.transform_input = True
    with torch.no_grad():
        ref = torch.softmax(net(clf.preprocess(x)), dim=1)
    assert p.shape == (2, 1000) and torch.allclose(p, ref, atol=1e-6)


def test_is_network_is_inception_v3_with_its_weights_own_preprocessing(inception_weights):
    import hashlib

    from torchvision.models import Inception_V3_Weights

    path, net = inception_weights
    clf = load_is_network(path)
    assert clf.kind == "inception" and clf.num_classes == 1000
    assert clf.input_size == 299 and clf.resize_size == 342  # torchvision: resize 342, centre crop 299
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert clf.record["weights_sha256"] == digest and clf.identity == f"inception_v3@{path.resolve()}#sha256:{digest[:12]}"
    assert clf.record["torchvision_file"] is False  # random weights: not torchvision's own file (0cc3c7bd...)
    assert "resize 342 bilinear" in clf.record["preprocessing"] and "centre crop 299" in clf.record["preprocessing"]
    x = torch.rand(2, 3, 64, 64)  # generated images at the LDM's resolution
    p = clf.probs(x)
    net.transform_input = True  # as torchvision's pretrained builder sets it
    with torch.no_grad():  # the independent route: torchvision's own preset transform, then the network
        ref = torch.softmax(net(Inception_V3_Weights.IMAGENET1K_V1.transforms()(x)), dim=1)
    assert p.shape == (2, 1000) and torch.allclose(p, ref, atol=1e-5)
    assert json.loads(json.dumps(clf.describe()))["resize_size"] == 342


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 40, 56), (1, 3, 500, 300)])
def test_resize_and_crop_is_torchvisions_preset(shape):
    import torchvision.transforms.functional as TF

    from neuroimagen.models.classifier import resize_and_crop

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    ref = TF.center_crop(TF.resize(x, [342], interpolation=TF.InterpolationMode.BILINEAR, antialias=True), [299])
    out = resize_and_crop(x, 342, 299)
    assert out.shape == ref.shape == (shape[0], 3, 299, 299) and torch.allclose(out, ref, atol=1e-5)


WNIDS = ["n01440764", "n01443537", "n02106662", "n02124075", "n02389026"]  # classifier order


@pytest.mark.parametrize("layout", ["imagenet_class_index", "list", "lines", "synset_mapping"])
def test_read_class_index_layouts(tmp_path, layout):
    from neuroimagen.models.classifier import read_class_index

    path = tmp_path / "classes"
    if layout == "imagenet_class_index":
        path.write_text(json.dumps({str(i): [w, f"name {i}"] for i, w in reversed(list(enumerate(WNIDS)))}))
    elif layout == "list":
        path.write_text(json.dumps(WNIDS))
    elif layout == "lines":
        path.write_text("\n".join(WNIDS) + "\n\n")
    else:
        path.write_text("".join(f"{w} name {i}, other name\n" for i, w in enumerate(WNIDS)))
    assert read_class_index(path) == WNIDS


@pytest.mark.parametrize("text, frag", [
    ('{"0": ["n01440764", "tench"], "2": ["n01443537", "goldfish"]}', "keys must be the class indices 0..1"),
    ('{"0": ["tench", "n01440764"]}', "class 0: 'tench' is not a WordNet id"),
    ("n01440764\nn01443537\nn01440764\n", "n01440764 is listed twice (classes 0 and 2)"),
    ('{"0": ', "not valid JSON"),
    ("", "no classes"),
])
def test_read_class_index_errors_are_one_line(tmp_path, text, frag):
    from neuroimagen.models.classifier import read_class_index

    path = tmp_path / "classes.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_class_index(path)
    assert str(err.value).startswith(str(path)) and frag in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        read_class_index(tmp_path / "missing.json")


def test_label_to_class_maps_dataset_wnids_to_classifier_indices():
    from neuroimagen.models.classifier import label_to_class

    dataset = ["n02389026", "n02106662", "n01440764"]  # label order
    assert label_to_class(dataset, WNIDS, "f.json") == [4, 2, 0]
    assert label_to_class(["n02389026", "n09999999"], WNIDS, "f.json", missing=-1) == [4, -1]
    with pytest.raises(ConfigError, match=r"f.json: the dataset's class n09999999 \(label 1\) is not among its 5"):
        label_to_class(["n02389026", "n09999999"], WNIDS, "f.json")


def test_class_file_that_does_not_match_the_head_is_one_clear_error(mobilenet_weights):
    from neuroimagen.reconstruction.factory import load_classifier_spec

    path, _ = mobilenet_weights
    spec = {"kind": "torchvision", "arch": "mobilenet_v3_small", "weights": str(path), "image_size": None,
            "class_names": WNIDS, "classes_file": "classes.json"}
    with pytest.raises(ConfigError, match=r"eval.classifier_classes: classes.json: lists 5 classes, but .* has 1000"):
        load_classifier_spec(spec)
    names = [f"n{i:08d}" for i in range(1000)]
    assert load_classifier_spec({**spec, "class_names": names}).class_names == names


def _tv_config(path, classes=None):
    from neuroimagen.config import Config, from_dict

    ev = {"classifier": "mobilenet_v3_small", "classifier_weights": str(path)}
    return from_dict(Config, {"eval": {**ev, **({"classifier_classes": str(classes)} if classes else {})}})


def _splits(class_ids):
    from types import SimpleNamespace

    rec = SimpleNamespace(class_ids=list(class_ids))
    return {"train": SimpleNamespace(recording=rec, num_classes=len(class_ids))}


def test_prepare_classifier_maps_the_dataset_wnids_through_the_class_file(mobilenet_weights, tmp_path):
    from neuroimagen.runs.evaluation import prepare_classifier

    path, _ = mobilenet_weights
    classes = tmp_path / "imagenet_class_index.json"
    classes.write_text(json.dumps({str(i): [w, "x"] for i, w in enumerate(WNIDS)}))
    spec, desc = prepare_classifier(_tv_config(path, classes), tmp_path, _splits(["n02106662", "n01440764"]), 64)
    assert desc["label_to_class"] == [2, 0] and str(classes) in desc["label_space"]
    assert spec["class_names"] == WNIDS and "gt_accuracy_unavailable" not in desc
    assert desc["covered_labels"] == [0, 1] and desc["coverage"].endswith(": 2 of 2")
    # a dataset class the file lacks (a THINGS concept, a WNID outside the index) is recorded as not covered:
    # evaluate withholds ACC if the evaluated split holds it
    _, desc = prepare_classifier(_tv_config(path, classes), tmp_path,
                                 _splits(["n02106662", "00001_aircraft_carrier", "n03000000"]), 64)
    assert desc["label_to_class"] == [2, -1, -1] and desc["covered_labels"] == [0]
    assert desc["coverage"] == (f"the dataset classes whose id is in {classes}: 1 of 3 (not there: "
                                "'00001_aircraft_carrier' and 1 more)")


def test_prepare_classifier_without_a_class_file_reports_gt_accuracy_unavailable(mobilenet_weights, tmp_path):
    from neuroimagen.runs.evaluation import prepare_classifier

    path, _ = mobilenet_weights
    _, desc = prepare_classifier(_tv_config(path), tmp_path, _splits(["n02106662", "n01440764"]), 64)
    assert desc["label_to_class"] is None
    assert "eval.classifier_classes is not set" in desc["gt_accuracy_unavailable"]


def test_classifier_classes_needs_a_torchvision_classifier(tmp_path):
    from neuroimagen.config import Config, from_dict

    with pytest.raises(ConfigError, match="eval.classifier_classes: only for a torchvision eval.classifier"):
        from_dict(Config, {"eval": {"classifier_classes": str(tmp_path / "c.json")}})
    with pytest.raises(ConfigError, match="eval.is_weights: eval.is_network: inception_v3 needs eval.is_weights"):
        from_dict(Config, {"eval": {"is_network": "inception_v3"}})
    with pytest.raises(ConfigError, match="eval.is_weights"):
        from_dict(Config, {"eval": {"is_weights": str(tmp_path / "w.pth")}})


def test_vit_image_size_is_read_from_the_state_dict():
    from neuroimagen.models.classifier import _vit_image_size

    swag = {"encoder.pos_embedding": torch.zeros(1, 37 * 37 + 1, 8), "conv_proj.weight": torch.zeros(8, 3, 14, 14)}
    assert _vit_image_size(swag) == 518
    assert _vit_image_size({"encoder.pos_embedding": torch.zeros(1, 16 * 16 + 1, 8),
                            "conv_proj.weight": torch.zeros(8, 3, 14, 14)}) == 224
    assert _vit_image_size({}) is None


def test_import_is_light():
    code = ("import sys, neuroimagen.models.classifier\n"
            "print('torchvision' in sys.modules, any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "False False"
