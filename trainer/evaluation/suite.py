"""An evaluation suite: the typed YAML file that lists a battery's datasets (`tools/evaluate.py --suite`).

Each dataset names where it lives (relative to `--root`), its tasks, its class names and prompt
templates (the dataset's own files, or list files shipped in the repository, relative to the suite
file), the metric its table shows, and for out-of-domain sets how its stored labels map into a
parent label set (`LabelSpace`). The shipped suites are in trainer/configs/eval/ (docs/EVALUATION.md).

Label spaces (ImageNet's variants): the parent is ImageNet's 1,000 classes, given by its class names
and WordNet IDs in index order; `subset` (WordNet IDs) says which of them are scored (ImageNet-R and
-A: 200); absent, all are. The zero-shot classifier is built from the subset's names in parent
order, so its logits are exactly the subset's columns of the 1,000-class classifier (a class's
embedding depends on its own name only). `stored` says how the dataset's labels read, and the map
into the subset is applied exactly once, when the dataset is opened:
- `subset_index`: labels already index the subset (the CLIP benchmark's copies of -R and -A, whose
  classnames.txt has the subset's 200 names);
- `parent_index`: labels index the parent (the CLIP benchmark's ImageNet, -V2, -Sketch);
  both need shards with as many class names as the subset / parent (else refused; an ImageFolder too);
- `folder_wnid`: an ImageFolder whose class folders are WordNet IDs (the original releases of
  ImageNet val, -Sketch, -R, -A): WordNet ID -> parent index -> subset position;
- `folder_index`: an ImageFolder whose class folders are parent indices `0`...`999` (ImageNet-V2's
  release).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trainer.dataclass_io import ConfigError, from_dict
from trainer.evaluation.config import TASKS, LinearProbeConfig
from trainer.evaluation.data import CLIP_BENCHMARK_CLASSES, BadImages, EvalData, read_lines, read_list
from trainer.evaluation.text import TEXT_TASKS

# The number a dataset's table shows (SPEC: the SLIP battery's metrics); every metric is recorded.
METRICS = ("top1", "top5", "mean_per_class", "top1_top5_mean", "roc_auc")
STORED = ("subset_index", "parent_index", "folder_wnid", "folder_index")
MAX_SUITE_BYTES = 1 << 20


@dataclass
class LabelSpace:
    parent_classnames: str                 # list file: the parent's class names, in index order
    parent_wnids: str                      # list file: the parent's WordNet IDs, in index order
    subset: str | None = None              # list file: WordNet IDs scored; None = all of the parent
    stored: Literal[STORED] = "parent_index"


@dataclass
class DatasetSpec:
    name: str
    path: str                              # relative to --root (absolute paths are kept)
    tasks: tuple[str, ...] = ("zeroshot",)
    classnames: str | None = None          # list file; None = the dataset's own
    templates: str | None = None           # list file with {} or {c}; None = the dataset's own, else ImageNet's 7
    metric: Literal[METRICS] = "top1"
    labels: LabelSpace | None = None       # out-of-domain sets: their map into a parent label set
    # An ImageFolder's class folders: "names" = named by the class names; "sorted" = the i-th folder in
    # sorted order is class i of `classnames` (torchvision's ImageFolder, the SLIP reference's layout)
    folders: Literal["names", "sorted"] = "names"

    def __post_init__(self):
        # the name is a folder of the cache (<out>/cache/<model>/<name>/): one plain path component
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ValueError(f"name {self.name!r}: one folder name (no '/', '\\', '.' or '..')")
        known = TASKS + TEXT_TASKS
        unknown = [t for t in self.tasks if t not in known]
        if unknown or not self.tasks:
            raise ValueError(f"tasks {list(self.tasks)}: choose from {list(known)}")
        if set(self.tasks) & set(TEXT_TASKS) and set(self.tasks) - set(TEXT_TASKS):
            raise ValueError(f"tasks {list(self.tasks)}: text tasks and image tasks read different data; "
                             "list them as two datasets")
        if len(set(self.tasks) & set(TEXT_TASKS)) > 1:
            # sts reads a GLUE TSV file, text_probe a GLUE folder: no one path serves both
            raise ValueError(f"tasks {list(self.tasks)}: sts (a TSV file) and text_probe (a folder) read "
                             "different data; list them as two datasets")
        if self.labels is not None and self.classnames is not None:
            raise ValueError("classnames: a dataset with a label space is scored with the parent's names; "
                             "give one or the other")
        if self.folders == "sorted" and self.classnames is None:
            raise ValueError("folders: sorted needs the classnames list the sorted folders index")

    @property
    def text(self) -> bool:
        return bool(set(self.tasks) & set(TEXT_TASKS))


@dataclass
class SuiteConfig:
    datasets: list[DatasetSpec]
    description: str = ""
    batch_size: int | None = None          # None: each model's eval.batch_size
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)

    def __post_init__(self):
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"datasets: the name {dup[0]!r} is used twice")
        if not names:
            raise ValueError("datasets: the suite lists no dataset")


def load_suite(path: str | Path) -> SuiteConfig:
    """The suite file, every value type-checked; list files are resolved against the suite's folder."""
    from trainer.config import error_line, read_yaml_file
    path = Path(path)
    data, lines = read_yaml_file(path, "an evaluation suite", MAX_SUITE_BYTES)
    try:
        suite = from_dict(SuiteConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}:{error_line(e, lines)}: {e}") from None
    here = path.resolve().parent
    for d in suite.datasets:
        for obj, key in ((d, "classnames"), (d, "templates"), (d.labels, "parent_classnames"),
                         (d.labels, "parent_wnids"), (d.labels, "subset")):
            if obj is not None and getattr(obj, key) is not None:
                file = here / getattr(obj, key)
                if not file.is_file():
                    raise ConfigError(f"{path}: dataset {d.name!r}: {key} {file}: no such file")
                setattr(obj, key, str(file))
    return suite


def subset_names(space: LabelSpace) -> tuple[list[str], dict[int, int]]:
    """The scored class names (parent order) and parent index -> subset position."""
    names = read_list(space.parent_classnames, "class names")
    wnids = read_list(space.parent_wnids, "WordNet IDs")
    if len(names) != len(wnids):
        raise ValueError(f"{space.parent_classnames} has {len(names)} class names but {space.parent_wnids} "
                         f"has {len(wnids)} WordNet IDs")
    if space.subset is None:
        keep = list(range(len(wnids)))
    else:
        wanted = read_list(space.subset, "WordNet IDs")
        unknown = sorted(set(wanted) - set(wnids))
        if unknown:
            raise ValueError(f"{space.subset}: WordNet IDs not in {space.parent_wnids}: {unknown[:5]}")
        keep = [i for i, w in enumerate(wnids) if w in set(wanted)]
    return [names[i] for i in keep], {p: s for s, p in enumerate(keep)}


def _image_folder(data: EvalData) -> bool:
    """Whether the evaluated split is an ImageFolder directory (no shards in it)."""
    where = data.test.location
    return where.is_dir() and not any(where.glob("*.tar"))


def apply_label_space(data: EvalData, space: LabelSpace) -> EvalData:
    """`data` with labels that index the subset and the subset's class names (see the module doc)."""
    names, position = subset_names(space)
    wnids = read_list(space.parent_wnids, "WordNet IDs")
    parent_of_wnid = {w: i for i, w in enumerate(wnids)}
    own = data.classnames                  # as opened: the dataset's names, or its folder names
    if space.stored in ("subset_index", "parent_index") and _image_folder(data):
        # an ImageFolder's labels are its folders' positions in sorted order ("10" before "2"), not indices
        raise ValueError(f"{data.location}: an ImageFolder's labels are its sorted folder positions, not "
                         f"{space.stored} indices; use labels.stored folder_wnid or folder_index")
    expected = {"subset_index": ("the subset", len(names)), "parent_index": ("the parent", len(wnids))}
    if space.stored in expected and len(own) != expected[space.stored][1]:
        # a copy with another class count indexes another label set: scored silently wrong otherwise
        raise ValueError(f"{data.location}: labels.stored is {space.stored} but the dataset has {len(own)} "
                         f"classes and {expected[space.stored][0]} {expected[space.stored][1]}")

    def to_subset(label: int) -> int | None:
        if space.stored == "subset_index":
            return label if 0 <= label < len(names) else None
        if space.stored == "parent_index":
            return position.get(label)
        folder = own[label]
        if space.stored == "folder_wnid":
            parent = parent_of_wnid.get(folder)
        else:
            parent = int(folder) if folder.isdigit() else None
        return position.get(parent) if parent is not None else None

    bad = BadImages(list(data.bad.items))
    for split in (data.test, data.train):
        if split is None:
            continue
        kept = []
        for s in split.samples:
            new = to_subset(s.label)
            if new is None:
                bad.add(s.name, ValueError(f"class {own[s.label] if 0 <= s.label < len(own) else s.label!r} "
                                           f"is not one of the {len(names)} classes scored"))
            else:
                kept.append(dataclasses.replace(s, label=new))
        split.samples, split.classnames = kept, names
    return dataclasses.replace(data, classnames=names, bad=bad)


def open_dataset(spec: DatasetSpec) -> EvalData:
    """An image dataset of the suite, opened at its resolved `spec.path`, label space applied. A
    class-name list given for a dataset that has its own (`classnames.txt` of the CLIP benchmark)
    must have as many names: a list in another label order would score silently wrong."""
    location = Path(spec.path)
    if spec.folders == "sorted":
        names = read_list(spec.classnames, "class names")
        data = EvalData.open(spec.path, None, spec.templates)
        if len(data.classnames) != len(names):
            raise ValueError(f"{location}: {len(data.classnames)} class folders but {spec.classnames} has "
                             f"{len(names)} class names")
        for split in (data.test, data.train):
            if split is not None:
                split.classnames = names
        return dataclasses.replace(data, classnames=names)
    own = location / CLIP_BENCHMARK_CLASSES
    if spec.classnames is not None and own.is_file():
        theirs, ours = read_lines(own, "class names"), read_list(spec.classnames, "class names")
        if len(theirs) != len(ours):
            raise ValueError(f"{own} has {len(theirs)} class names but {spec.classnames} has {len(ours)}")
    data = EvalData.open(spec.path, spec.classnames, spec.templates)
    return apply_label_space(data, spec.labels) if spec.labels is not None else data
