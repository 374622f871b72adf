"""Tiny evaluation datasets in each loader's real on-disk layout (docs/datasets.md), as the paper
presets read them through `$KTPIPE_DATASETS/...`. Not a test module: `build_datasets(root)` writes
them all under `root` (conftest's session fixture `preset_datasets` builds them once).

Every image is a small picture of a simple shape on a noisy background (32-64 px), drawn from a
generator seeded per dataset, so the folders are the same on every run; the whole build takes
about a second. What each layout holds:

- `imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG`: the 1000 wnids of ktpipe/data/imagenet/ (the
  `imagenet` loader needs every one), `IMAGENET_PER_CLASS` images each;
- `rare_concepts/<concept>/*.jpg`: Table 1's three concepts (the user's own images in the paper);
- `flickr30k/dataset_flickr30k.json` (Karpathy's split file) and `flickr30k/images/<filename>`;
- `mscoco/dataset_coco.json` (Karpathy's split file) and `mscoco/<filepath>/<filename>`
  (val2014/COCO_val2014_*.jpg, train2014/COCO_train2014_*.jpg);
- `chexpert/chexpert_5x200.csv` (MedCLIP / GLoRIA's columns, one positive among the five classes)
  and the images it lists under `chexpert/CheXpert-v1.0/valid/...`;
- `jsrt/CLNDAT_EN.txt` (JSRT's clinical file, one nodule case per line) and `jsrt/<case>.png`;
- the segmentation sets of table4_medclip_samv2 (`unitochest`, `siim_pneumothorax`, `udiat`,
  `brats23`) and their validation sets (`<set>_val`, which MedCLIP-SAMv2's saliency search reads):
  `images/<stem>.png` with a binary 0/255 mask `masks/<stem>.png` of the drawn shape.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ktpipe.datasets.imagenet import imagenet_wnids
from ktpipe.datasets.medical import CHEXPERT_CLASSES

SEED = 0
IMAGENET_PER_CLASS = 1  # 1000 folders: one image each keeps the build under a second
PER_CLASS = 3  # images per class (or per set) everywhere else
RARE_CONCEPTS = ("moongate", "tonometer", "gyroscope")  # Table 1 (captions/rare_concepts.yaml)
SEGMENTATION_SETS = ("unitochest", "siim_pneumothorax", "udiat", "brats23")  # roots in table4_medclip_samv2.yaml,
# each with its validation set <root>_val
SHAPES = ("ellipse", "rectangle", "triangle")

# Karpathy split entries: (split, captions); the captions name MSCOCO classes (captions/mscoco.yaml), so
# retrieval and captioning have target images, and a few name none of them (retention).
FLICKR = [
    ("test", ["A person rides a bicycle down the street.", "A man on a bike.", "Someone cycling past a car.",
              "A person with a bicycle outside.", "A cyclist on a road."]),
    ("test", ["A dog runs across the grass.", "A brown dog playing outside.", "A dog chasing a ball.",
              "An animal running on a lawn.", "A dog in a park."]),
    ("test", ["Two people sit on a bench.", "A couple resting on a bench.", "People sitting outdoors.",
              "Two friends on a park bench.", "A bench with two people."]),
    ("test", ["A view of the mountains at sunset.", "Hills under an orange sky.", "The sun sets behind hills.",
              "A quiet landscape in the evening.", "Mountains and a colorful sky."]),
    ("train", ["A cat sleeps on a couch.", "A cat resting.", "A sleeping cat.", "A cat on a sofa.", "A lazy cat."]),
    ("val", ["A bus on a city street.", "A red bus.", "A bus waiting.", "A city bus.", "A bus at a stop."]),
]
COCO = [
    ("test", "val2014", ["A person riding a bicycle down a street.", "A man rides his bike on the road.",
                         "Someone on a bicycle near parked cars.", "A cyclist passing a car.",
                         "A person with a bicycle in the city."]),
    ("test", "val2014", ["A dog sitting on a couch.", "A small dog resting on a sofa.", "A dog lying on a couch.",
                         "A brown dog on the furniture.", "A dog on a couch in a living room."]),
    ("test", "val2014", ["A pizza on a dining table.", "A large pizza on a table.", "A pizza with cheese.",
                         "Food on a dining table.", "A pizza ready to eat."]),
    ("test", "val2014", ["A view of a quiet beach.", "Waves on the sand.", "The sea under a blue sky.",
                         "An empty beach in the morning.", "Water and sand on a sunny day."]),
    ("restval", "val2014", ["A cat next to a laptop.", "A cat sleeping by a laptop.", "A laptop and a cat.",
                            "A cat on a desk.", "A cat beside a computer."]),
    ("val", "val2014", ["Two people near a bus.", "People waiting for a bus.", "A bus and two people.",
                        "A bus stop with people.", "People by a city bus."]),
    ("train", "train2014", ["A train at a station.", "A long train.", "A train on tracks.", "A passenger train.",
                            "A train arriving."]),
]
# JSRT nodule cases as CLNDAT_EN.txt lists them (file, subtlety, size mm, age, sex, x, y, diagnosis, location, finding)
JSRT_CASES = [
    ("JPCLN001.IMG", 5, 15, 53, "male", 1634, 692, "malignant", "l.upper lobe", "lung cancer"),
    ("JPCLN002.IMG", 5, 30, 73, "female", 1614, 1022, "malignant", "r.upper lobe", "lung cancer"),
    ("JPCLN003.IMG", 4, 12, 64, "male", 1378, 1346, "malignant", "r.middle lobe", "lung cancer"),
    ("JPCLN101.IMG", 3, 18, 61, "female", 512, 1200, "benign", "r.lower lobe", "hamartoma"),
    ("JPCLN102.IMG", 4, 10, 47, "male", 1500, 800, "benign", "l.upper lobe", "granuloma"),
    ("JPCLN103.IMG", 2, 20, 58, "female", 700, 900, "benign", "r.upper lobe", "inflammatory mass"),
]


def generator(name: str) -> np.random.Generator:
    """A generator seeded by SEED and the dataset's name (each dataset's images stay fixed alone)."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def shape_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a shape covering a quarter to a half of each side."""
    w, h = (int(rng.integers(s // 4, s // 2 + 1)) for s in (width, height))
    x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    return x0, y0, x0 + w, y0 + h


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: int | tuple) -> None:
    """An ellipse, rectangle or triangle filling `box`."""
    x0, y0, x1, y1 = box
    if shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)


def shape_picture(rng: np.random.Generator, kind: int, size: tuple[int, int] = (32, 32),
                  gray: bool = False) -> tuple[Image.Image, Image.Image]:
    """(image, 0/255 mask of the shape): shape and colour from `kind`, noise and placement from `rng`."""
    width, height = size
    channels = 1 if gray else 3
    noise = rng.integers(0, 90, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(noise[..., 0] if gray else noise, "L" if gray else "RGB")
    mask = Image.new("L", size, 0)
    box = shape_box(rng, width, height)
    shape = SHAPES[kind % len(SHAPES)]
    colour = 150 + kind * 37 % 100 if gray else (80 + kind * 53 % 170, 80 + kind * 97 % 170, 80 + kind * 29 % 170)
    draw_shape(ImageDraw.Draw(image), shape, box, colour)
    draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    return image, mask


def save(image: Image.Image, path: Path) -> None:
    """Write an image, creating its folder (the format follows the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_imagenet(val: Path) -> None:
    """ImageNet-1k validation sorted into wnid folders: val/<wnid>/ILSVRC2012_val_<n>.JPEG."""
    rng = generator("imagenet")
    for k, wnid in enumerate(imagenet_wnids()):
        for j in range(IMAGENET_PER_CLASS):
            n = k * IMAGENET_PER_CLASS + j + 1
            save(shape_picture(rng, k)[0], val / wnid / f"ILSVRC2012_val_{n:08d}.JPEG")


def write_rare_concepts(root: Path) -> None:
    """root/<concept>/<n>.jpg for Table 1's concepts."""
    rng = generator("rare_concepts")
    for k, concept in enumerate(RARE_CONCEPTS):
        for j in range(PER_CLASS):
            save(shape_picture(rng, k, (48, 40))[0], root / concept / f"{concept}_{j:02d}.jpg")


def karpathy_entry(index: int, split: str, captions: list[str], filename: str, filepath: str | None) -> dict:
    """One `images` entry of a Karpathy split file, with its sentences tokenized as Karpathy's are."""
    sentences = [{"tokens": caption.lower().rstrip(".").split(), "raw": caption, "imgid": index,
                  "sentid": 5 * index + j} for j, caption in enumerate(captions)]
    entry = {"filename": filename, "imgid": index, "split": split, "sentences": sentences,
             "sentids": [s["sentid"] for s in sentences]}
    return entry if filepath is None else {"filepath": filepath, **entry, "cocoid": 100000 + index}


def write_flickr30k(root: Path) -> None:
    """dataset_flickr30k.json and images/<filename>."""
    rng = generator("flickr30k")
    entries = []
    for i, (split, captions) in enumerate(FLICKR):
        filename = f"{1000092795 + 1000 * i}.jpg"
        save(shape_picture(rng, i, (48, 32))[0], root / "images" / filename)
        entries.append(karpathy_entry(i, split, captions, filename, None))
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))


def write_mscoco(root: Path) -> None:
    """dataset_coco.json and <filepath>/<filename> (val2014/COCO_val2014_*.jpg, train2014/...)."""
    rng = generator("mscoco")
    entries = []
    for i, (split, filepath, captions) in enumerate(COCO):
        filename = f"COCO_{filepath}_{100000 + i:012d}.jpg"
        save(shape_picture(rng, i, (40, 48))[0], root / filepath / filename)
        entries.append(karpathy_entry(i, split, captions, filename, filepath))
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))


def write_chexpert(root: Path) -> None:
    """chexpert_5x200.csv (Path, patient columns, one-hot classes) and the grayscale images it lists."""
    rng = generator("chexpert")
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_CLASSES]
    rows = [",".join(header)]
    for k, finding in enumerate(CHEXPERT_CLASSES):
        for j in range(PER_CLASS):
            path = f"CheXpert-v1.0/valid/patient{64541 + PER_CLASS * k + j}/study1/view1_frontal.jpg"
            save(shape_picture(rng, k, (40, 40), gray=True)[0], root / path)
            onehot = ["1.0" if c == finding else "0.0" for c in CHEXPERT_CLASSES]
            rows.append(",".join([path, "Female" if j % 2 else "Male", str(40 + 7 * j), "Frontal", "AP", *onehot]))
    (root / "chexpert_5x200.csv").write_text("\n".join(rows) + "\n")


def write_jsrt(root: Path) -> None:
    """CLNDAT_EN.txt (tab-separated case lines) and <case>.png converted from the raw .IMG files."""
    rng = generator("jsrt")
    lines = []
    for k, case in enumerate(JSRT_CASES):
        lines.append("\t".join(map(str, case)))
        stem = case[0].removesuffix(".IMG")
        save(shape_picture(rng, k, (48, 48), gray=True)[0], root / f"{stem}.png")
    (root / "CLNDAT_EN.txt").write_text("\n".join(lines) + "\n")


def write_masks(root: Path, name: str) -> None:
    """A flat `masks` set: images/<stem>.png with its binary mask masks/<stem>.png."""
    rng = generator(name)
    for j in range(PER_CLASS):
        image, mask = shape_picture(rng, j, (48, 40), gray=True)
        save(image, root / "images" / f"{name}_{j:04d}.png")
        save(mask, root / "masks" / f"{name}_{j:04d}.png")


def build_datasets(root: Path) -> Path:
    """Write every dataset layout the presets read under `root` (their $KTPIPE_DATASETS); returns root."""
    root = Path(root)
    write_imagenet(root / "imagenet" / "val")
    write_rare_concepts(root / "rare_concepts")
    write_flickr30k(root / "flickr30k")
    write_mscoco(root / "mscoco")
    write_chexpert(root / "chexpert")
    write_jsrt(root / "jsrt")
    for name in (*SEGMENTATION_SETS, *(f"{s}_val" for s in SEGMENTATION_SETS)):
        write_masks(root / name, name)
    return root
