"""Sample-quality metrics through torch-fidelity 0.4, fully offline.

FID / IS / KID / precision-recall are torch-fidelity's own functions (``metric_fid``, ``metric_isc``,
``metric_kid``, ``metric_prc``) applied to features it extracts; this module only chooses the inputs,
the local weights and the names:

- Inception-v3 weights come from a local file (never downloaded): the ``inception_weights`` argument,
  else ``$MAR_INCEPTION_WEIGHTS``, else ``~/.cache/mar/<file>``, else torch hub's checkpoint folder.
- Features are extracted once per image set and shared by all metrics. FID against stored statistics
  uses ``fid_statistics_to_metric`` (torch-fidelity 0.4 has no statistics-file argument).
- Settings are checked before any features are extracted (``kid_subset_size`` at least 2, for instance).
- With ``features="fmnist"`` the same machinery runs on the project's Fashion-MNIST classifier
  (``mar.eval.classifier``) and the results are named ``fd_fmnist``, ``is_fmnist``, ``kd_fmnist``, ... never FID.

Image sources (folders, ADM npz, arrays) and statistics files (ADM ``.npz``, ours ``.safetensors``) are
read and written by ``mar.eval.files``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from mar.eval.classifier import FeatureExtractorFMNIST, class_accuracy, load_classifier, register_fmnist_extractor
from mar.eval.files import FIDStatistics, ImageFiles, load_statistics, open_images, save_statistics, stats_format

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_WEIGHTS_ENV = "MAR_INCEPTION_WEIGHTS"
INCEPTION_EXTRACTOR = "inception-v3-compat"
ALL_METRICS = ("fid", "isc", "kid", "prc")

# torch-fidelity result key -> our output name, per feature space
_NAMES = {
    "inception": {KEY_METRIC_FID: "fid", "inception_score_mean": "is_mean", "inception_score_std": "is_std",
                  "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std",
                  "precision": "precision", "recall": "recall", "f_score": "f_score"},
    "fmnist": {KEY_METRIC_FID: "fd_fmnist", "inception_score_mean": "is_fmnist_mean",
               "inception_score_std": "is_fmnist_std", "kernel_inception_distance_mean": "kd_fmnist_mean",
               "kernel_inception_distance_std": "kd_fmnist_std", "precision": "precision_fmnist",
               "recall": "recall_fmnist", "f_score": "f_score_fmnist"},
}
_DESCRIPTIONS = {
    ("inception", "fid"): "Frechet Inception Distance: torch-fidelity Inception-v3 (TF 2015 port), 2048-d pool",
    ("inception", "isc"): "Inception Score: Inception-v3 logits without fc bias (torch-fidelity), mean/std over splits",
    ("inception", "kid"): "Kernel Inception Distance: unbiased MMD^2, cubic polynomial kernel, Inception pool features",
    ("inception", "prc"): "improved precision/recall/F (k=3) on Inception-v3 pool features (ADM convention)",
    ("fmnist", "fid"): "Frechet distance on the project's Fashion-MNIST classifier features (not FID)",
    ("fmnist", "isc"): "Inception-Score formula on the Fashion-MNIST classifier's 10 logits (not IS)",
    ("fmnist", "kid"): "kernel distance (KID formula) on the Fashion-MNIST classifier features (not KID)",
    ("fmnist", "prc"): "improved precision/recall/F (k=3) on the Fashion-MNIST classifier features",
    "class_accuracy": "fraction of class-labelled samples the Fashion-MNIST classifier assigns to their class",
}


# --- weights ----------------------------------------------------------------------------------------------------
def inception_weights_candidates() -> list[str]:
    """Default places searched for the Inception weights: ~/.cache/mar, then torch hub's checkpoints."""
    return [os.path.join(os.path.expanduser("~"), ".cache", "mar", INCEPTION_WEIGHTS_FILE),
            os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)]


def resolve_inception_weights(path: str | None = None) -> str:
    """The local Inception-v3 weights file: ``path``, else $MAR_INCEPTION_WEIGHTS, else a default place."""
    how = (f"download {INCEPTION_WEIGHTS_URL} on a machine with internet and pass --inception-weights PATH, "
           f"set {INCEPTION_WEIGHTS_ENV}=PATH, or put it at {inception_weights_candidates()[0]}")
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    for given, origin in ((path, "--inception-weights"), (env, INCEPTION_WEIGHTS_ENV)):
        if given:
            if not os.path.isfile(given):
                raise FileNotFoundError(f"Inception weights {given} (from {origin}) not found: the file needed is "
                                        f"{INCEPTION_WEIGHTS_FILE}; {how}")
            return given
    for candidate in inception_weights_candidates():
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"Inception weights {INCEPTION_WEIGHTS_FILE} not found (searched "
                            f"{', '.join(inception_weights_candidates())}); {how}")


def check_inception_weights(path: str) -> None:
    """Open the file safely (weights_only) and check it is a state dict of torch-fidelity's InceptionV3."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unpickling errors come in several types
        raise ValueError(f"{path} is not a PyTorch state dict ({type(e).__name__}); expected "
                         f"{INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"{path} is not a state dict of torch-fidelity's FeatureExtractorInceptionV3 (no fc.weight "
                         f"of shape 1008x2048); expected {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class FeatureSpace:
    """A feature extractor with its local weights: ``kind`` "inception" or "fmnist"."""

    kind: str
    extractor: str  # torch-fidelity registry name
    weights: str

    @property
    def names(self) -> dict[str, str]:
        """torch-fidelity result key -> our output name."""
        return _NAMES[self.kind]

    def layer(self, metric: str) -> str:
        """The feature layer a metric ("fid", "isc", "kid", "prc") uses."""
        cls = FeatureExtractorFMNIST if self.kind == "fmnist" else FeatureExtractorInceptionV3
        return cls.get_default_feature_layer_for_metric(metric)


def feature_space(features: str = "inception", inception_weights: str | None = None,
                  classifier: str | None = None) -> FeatureSpace:
    """Resolve and check the weights for ``features`` ("inception" or "fmnist")."""
    if features == "inception":
        path = resolve_inception_weights(inception_weights)
        check_inception_weights(path)
        return FeatureSpace("inception", INCEPTION_EXTRACTOR, path)
    if features == "fmnist":
        if not classifier:
            raise ValueError("features 'fmnist' need --classifier PATH (train one with `python evaluate.py "
                             "train-classifier --data /usr/share/datasets/fashion-mnist --out FILE`)")
        load_classifier(classifier)  # checks the file now, with its clear errors
        return FeatureSpace("fmnist", register_fmnist_extractor(), classifier)
    raise ValueError(f"unknown features {features!r}: choose 'inception' or 'fmnist'")


# --- extraction and scoring ---------------------------------------------------------------------------------------
_GROUPS = {"fid": (KEY_METRIC_FID,), "isc": ("inception_score_mean", "inception_score_std"),
           "kid": ("kernel_inception_distance_mean", "kernel_inception_distance_std"),
           "prc": ("precision", "recall", "f_score")}  # torch-fidelity result keys of each metric


def parse_metrics(metrics, allowed=ALL_METRICS) -> tuple[str, ...]:
    """"fid,isc" or ("fid", "isc") -> ("fid", "isc"), checked against ``allowed``."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    bad = [m for m in names if m not in ALL_METRICS]
    if bad or not names:
        raise ValueError(f"unknown metrics {bad or names}: choose from {','.join(ALL_METRICS)}")
    if set(names) - set(allowed):
        raise ValueError(f"metrics {','.join(sorted(set(names) - set(allowed)))} need reference images (--ref), "
                         "not a statistics file (it holds only mu and sigma, for fid)")
    return tuple(dict.fromkeys(names))


def check_kid_subset_size(kid_subset_size: int) -> None:
    """KID averages an unbiased MMD^2 over subsets of ``kid_subset_size`` images, which divides by m (m - 1)."""
    if kid_subset_size < 2:
        raise ValueError(f"kid_subset_size (--kid-subset-size) is {kid_subset_size}, but KID needs subsets of at "
                         "least 2 images (its unbiased estimate divides by m(m-1)): pass --kid-subset-size 2 or more "
                         "(default 1000; it is capped at the number of images per set)")


def _fidelity_kwargs(space: FeatureSpace, batch_size: int, cuda: bool | None, verbose: bool) -> dict:
    """torch-fidelity options: local weights (never a download), no on-disk cache, no loader workers on CPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {"cuda": cuda, "batch_size": batch_size, "save_cpu_ram": not cuda, "verbose": verbose, "cache": False,
            "feature_extractor_weights_path": space.weights, "rng_seed": 2020}


def extract_features(datasets: list[Dataset], space: FeatureSpace, metrics, kw: dict) -> list[dict]:
    """One torch-fidelity extractor for all ``datasets`` -> per dataset {layer: (N, D) float32 features}."""
    layers = sorted({space.layer(m) for m in metrics})
    extractor = create_feature_extractor(space.extractor, layers, **kw)
    return [extract_featuresdict_from_input_id(1, extractor, input1=ds, **kw) for ds in datasets]


def statistics_from_features(featuresdict: dict, space: FeatureSpace, source: str = "") -> FIDStatistics:
    """mu = mean, sigma = covariance of the FID-layer features (torch-fidelity's function), as float64."""
    layer = space.layer("fid")
    n = len(featuresdict[layer])
    if n < 2:
        raise ValueError(f"statistics need at least 2 images, got {n}")
    st = fid_featuresdict_to_statistics(featuresdict, layer)
    meta = {"feature_extractor": space.extractor, "feature_layer": layer, "weights_sha256": file_sha256(space.weights),
            "num_images": str(n), "source": source}
    return FIDStatistics(st["mu"].astype(np.float64), st["sigma"].astype(np.float64), meta)


def check_statistics_match(ref: FIDStatistics, space: FeatureSpace, where: str) -> None:
    """Refuse statistics made with another feature extractor or other weights (ADM files carry no metadata)."""
    made_with = ref.meta.get("feature_extractor")
    if made_with and made_with != space.extractor:
        raise ValueError(f"{where} was computed with {made_with} features, not {space.extractor}: pass the same "
                         f"--features, or recompute it with `evaluate.py ref-stats`")
    sha = ref.meta.get("weights_sha256")
    if sha and sha != file_sha256(space.weights):
        raise ValueError(f"{where} was computed with other {space.extractor} weights than {space.weights} "
                         f"(sha256 {sha[:12]}...): recompute it with `evaluate.py ref-stats`")


def _score(f_gen: dict, f_ref: dict | None, ref_stats: FIDStatistics | None, metrics, space: FeatureSpace,
           kw: dict, kid_subset_size: int, isc_splits: int) -> tuple[dict, dict]:
    """Metrics from extracted features (gen = torch-fidelity's input1, ref = input2) -> (values, settings)."""
    n_gen = len(next(iter(f_gen.values())))
    n_ref = len(next(iter(f_ref.values()))) if f_ref is not None else int(ref_stats.meta.get("num_images", 0)) or None
    out, used = {}, {"num_gen": n_gen, "num_ref": n_ref}
    if "prc" in metrics and min(n_gen, n_ref) < 4:
        raise ValueError(f"precision/recall need at least 4 images per set (k=3 neighbours), got {n_gen}/{n_ref}")
    if "kid" in metrics and min(n_gen, n_ref) < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n_gen}/{n_ref}")
    if "isc" in metrics:
        used["isc_splits"] = max(1, min(isc_splits, n_gen))
        out.update(isc_featuresdict_to_metric(f_gen, space.layer("isc"), **{**kw, "isc_splits": used["isc_splits"]}))
    if "fid" in metrics:
        gen = statistics_from_features(f_gen, space)
        ref = ref_stats if ref_stats is not None else statistics_from_features(f_ref, space)
        if ref.mu.shape != gen.mu.shape:
            raise ValueError(f"the reference statistics are {ref.mu.shape[0]}-d but the {space.extractor} features "
                             f"are {gen.mu.shape[0]}-d: compute the reference with the same --features")
        out.update(fid_statistics_to_metric({"mu": gen.mu, "sigma": gen.sigma}, {"mu": ref.mu, "sigma": ref.sigma},
                                            kw["verbose"]))
    if "kid" in metrics:
        used["kid_subset_size"] = min(kid_subset_size, n_gen, n_ref)
        out.update(kid_featuresdict_to_metric(f_gen, f_ref, space.layer("kid"),
                                              **{**kw, "kid_subset_size": used["kid_subset_size"]}))
    if "prc" in metrics:
        out.update(prc_featuresdict_to_metric(f_gen, f_ref, space.layer("prc"), **kw))
    used["descriptions"] = {", ".join(space.names[k] for k in _GROUPS[m]): _DESCRIPTIONS[space.kind, m]
                            for m in metrics}
    return {space.names[k]: float(v) for k, v in out.items()}, used


def _describe(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def score_folders(gen, ref, metrics=ALL_METRICS, features: str = "inception", inception_weights: str | None = None,
                  classifier: str | None = None, *, batch_size: int = 64, kid_subset_size: int = 1000,
                  isc_splits: int = 10, cuda: bool | None = None, verbose: bool = False,
                  fmnist_root: str | None = None) -> dict:
    """Generated images ``gen`` against reference images ``ref`` (each a folder, an ADM npz, a uint8 array,
    a Dataset or "fashion_mnist:train|test"); features of each set are extracted once for all metrics.

    Returns {"metrics": {name: float}, "meta": {...}}. Names: fid, is_mean, is_std, kid_mean, kid_std,
    precision, recall, f_score (inception); fd_fmnist, is_fmnist_mean, ..., f_score_fmnist (fmnist).
    """
    metrics = parse_metrics(metrics)
    if "kid" in metrics:
        check_kid_subset_size(kid_subset_size)
    datasets = [open_images(gen, fmnist_root), open_images(ref, fmnist_root)]
    space = feature_space(features, inception_weights, classifier)
    kw = _fidelity_kwargs(space, batch_size, cuda, verbose)
    f_gen, f_ref = extract_features(datasets, space, metrics, kw)
    values, used = _score(f_gen, f_ref, None, metrics, space, kw, kid_subset_size, isc_splits)
    return {"metrics": values, "meta": {**_meta(space, gen, ref), **used}}


def score_against_stats(gen, stats_path: str, metrics=("fid", "isc"), features: str = "inception",
                        inception_weights: str | None = None, classifier: str | None = None, *,
                        batch_size: int = 64, isc_splits: int = 10, cuda: bool | None = None,
                        verbose: bool = False) -> dict:
    """Generated images against a statistics file (ADM .npz or our .safetensors): fid (fd_fmnist), and IS."""
    metrics = parse_metrics(metrics, allowed=("fid", "isc"))
    dataset = open_images(gen)
    ref = load_statistics(stats_path)
    space = feature_space(features, inception_weights, classifier)
    check_statistics_match(ref, space, stats_path)
    kw = _fidelity_kwargs(space, batch_size, cuda, verbose)
    (f_gen,) = extract_features([dataset], space, metrics, kw)
    values, used = _score(f_gen, None, ref, metrics, space, kw, 0, isc_splits)
    return {"metrics": values, "meta": {**_meta(space, gen, stats_path), **used}}


def compute_reference_stats(source, out_path: str, format: str | None = None, features: str = "inception",
                            inception_weights: str | None = None, classifier: str | None = None, *,
                            batch_size: int = 64, cuda: bool | None = None, verbose: bool = False,
                            fmnist_root: str | None = None) -> FIDStatistics:
    """Statistics of ``source`` (as in ``score_folders``), written to ``out_path``: .npz (ADM) or .safetensors."""
    stats_format(out_path, format)
    dataset = open_images(source, fmnist_root)
    space = feature_space(features, inception_weights, classifier)
    kw = _fidelity_kwargs(space, batch_size, cuda, verbose)
    (feats,) = extract_features([dataset], space, ("fid",), kw)
    stats = statistics_from_features(feats, space, source=_describe(source))
    save_statistics(stats, out_path, format)
    return stats


def _meta(space: FeatureSpace, gen, ref) -> dict:
    return {"features": space.kind, "feature_extractor": space.extractor, "feature_weights": space.weights,
            "gen": _describe(gen), "reference": _describe(ref)}


def folder_class_accuracy(gen_dir: str, classifier: str) -> float | None:
    """Class accuracy of ``{index}_c{class}.png`` samples under the Fashion-MNIST classifier; None if unlabelled."""
    files = ImageFiles(gen_dir)
    labels = files.labels()
    if labels is None:
        return None
    images = torch.stack([files[i] for i in range(len(files))])  # (N, 3, H, W) uint8
    return class_accuracy(load_classifier(classifier), images, torch.tensor(labels))


def score_folder(gen, *, ref=None, ref_stats: str | None = None, metrics=None, features: str = "inception",
                 inception_weights: str | None = None, classifier: str | None = None, batch_size: int = 64,
                 kid_subset_size: int = 1000, isc_splits: int = 10, cuda: bool | None = None,
                 verbose: bool = False, fmnist_root: str | None = None) -> dict:
    """Score samples against reference images (``ref``) or a statistics file (``ref_stats``): exactly one.

    metrics None = all the reference allows (fid,isc,kid,prc with images; fid,isc with statistics). With a
    classifier file and class-labelled names ({index:06d}_c{class:03d}.png) ``class_accuracy`` is added.
    Returns {"metrics": {name: float}, "meta": {...}}.
    """
    if (ref is None) == (ref_stats is None):
        raise ValueError("give exactly one reference: reference images (--ref) or a statistics file (--ref-stats)")
    common = {"features": features, "inception_weights": inception_weights, "classifier": classifier,
              "batch_size": batch_size, "isc_splits": isc_splits, "cuda": cuda, "verbose": verbose}
    if ref is not None:
        result = score_folders(gen, ref, metrics or ALL_METRICS, kid_subset_size=kid_subset_size,
                               fmnist_root=fmnist_root, **common)
    else:
        result = score_against_stats(gen, ref_stats, metrics or ("fid", "isc"), **common)
    if classifier and isinstance(gen, (str, os.PathLike)) and os.path.isdir(gen):
        acc = folder_class_accuracy(os.fspath(gen), classifier)
        if acc is not None:
            result["metrics"]["class_accuracy"] = acc
            result["meta"]["descriptions"]["class_accuracy"] = _DESCRIPTIONS["class_accuracy"]
    return result
