"""Writers of small synthetic datasets in the layouts the real ones are distributed in.

Each writer fills a folder the way the dataset's archive unpacks (docs/datasets.md) with a few tiny
images whose content is easy to reason about: a bright optic disc on a dark fundus, lungs darker than
the body in a CT slice, a membrane grid in EM, horizontal layer bands in OCT. Nothing here is real
data and nothing is committed; the tests write it into their temporary folders.
"""
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def save(array, path):
    """Write an array with PIL (format from the suffix), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def disc_mask(height, width, centre, radius):
    rows, columns = np.mgrid[:height, :width]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < radius ** 2


def fundus(height, width, centre, radius, seed):
    """A dark red fundus with a pale optic disc of `radius` at `centre`; returns (image, disc mask)."""
    generator = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    field = disc_mask(height, width, (height / 2, width / 2), 0.48 * min(height, width))
    image[field] = (110, 45, 20)
    disc = disc_mask(height, width, centre, radius)
    image[disc] = (245, 215, 150)
    noise = generator.integers(0, 12, size=image.shape, dtype=np.uint8)
    return np.where(field[..., None], image + noise, image).astype(np.uint8), disc


def write_lines(path, lines):
    Path(path).write_text("".join(f"{line}\n" for line in lines))


# --- optic disc --------------------------------------------------------------------------------

def write_origa(root, train=("001", "002"), test=("003", "004"), size=(96, 128)):
    """ORIGA/images/<id>.jpg, ORIGA/masks/<id>.png with disc = 1 and cup = 2, Set_A.txt / Set_B.txt.
    The lists mix ids with and without the .jpg suffix, as copies in circulation do."""
    root = Path(root)
    height, width = size
    for index, name in enumerate((*train, *test)):
        centre = (height // 2 + 5 * index - 8, width // 3 + 7 * index)
        image, disc = fundus(height, width, centre, 12, seed=index)
        save(image, root / "images" / f"{name}.jpg")
        label = disc.astype(np.uint8)
        label[disc_mask(height, width, centre, 6)] = 2
        save(label, root / "masks" / f"{name}.png")
    write_lines(root / "Set_A.txt", [f"{name}.jpg" if index % 2 else name for index, name in enumerate(train)])
    write_lines(root / "Set_B.txt", [f"{name}.jpg" if index % 2 else name for index, name in enumerate(test)])
    return root


MESSIDOR_NAMES = ("20051019_38557_0100_PP", "20051020_43808_0100_PP", "20051020_44261_0100_PP",
                  "20051020_44349_0100_PP", "20060522_45162_0100_PP")


def write_messidor(root, names=MESSIDOR_NAMES, sizes=((96, 144), (112, 168), (120, 180)), lists=None):
    """Messidor/images/Base11/<name>.tif (images keep the archive's Base folder) and
    Messidor/masks/<name>.(png|tif|bmp) with the disc as 255, images of three sizes like the real
    set's 1440x960, 2240x1488 and 2304x1536. `lists`: optional (train names, test names)."""
    root = Path(root)
    mask_suffixes = (".png", ".tif", ".bmp")
    for index, name in enumerate(names):
        height, width = sizes[index % len(sizes)]
        image, disc = fundus(height, width, (height // 2, width - 30), 10, seed=10 + index)
        save(image, root / "images" / "Base11" / f"{name}.tif")
        save(disc.astype(np.uint8) * 255, root / "masks" / f"{name}{mask_suffixes[index % 3]}")
    if lists is not None:
        write_lines(root / "train.txt", lists[0])
        write_lines(root / "test.txt", lists[1])
    return root


def write_rimone(root, groups=(("Normal", 3), ("Deep", 2)), experts=5, size=(72, 64)):
    """RIM-ONE r1: <group>/Images/Im<NNN>.bmp for the first group and <group>/Im<NNN>.bmp (images
    straight in the diagnosis folder) for the others, and <group>/Expert<N>_masks/Im<NNN>-exp<N>.bmp.
    Expert N draws the disc with radius 14 + N - 3, so the majority vote is expert 3's disc."""
    root = Path(root)
    height, width = size
    centre = (height // 2, width // 2)
    for group_index, (group, count) in enumerate(groups):
        image_dir = root / group / "Images" if group_index == 0 else root / group
        for number in range(1, count + 1):
            stem = f"Im{number:03d}"
            image, _ = fundus(height, width, centre, 14, seed=100 * group_index + number)
            save(image, image_dir / f"{stem}.bmp")
            for expert in range(1, experts + 1):
                mask = disc_mask(height, width, centre, 14 + expert - 3).astype(np.uint8) * 255
                save(mask, root / group / f"Expert{expert}_masks" / f"{stem}-exp{expert}.bmp")
    return root


# --- lung CT ------------------------------------------------------------------------------------

def lung_slice(size, shift):
    """A 16-bit CT slice in Hounsfield units: air -1000 outside, body +40, two lungs at -850."""
    rows, columns = np.mgrid[:size, :size]
    slice_ = np.full((size, size), -1000, np.int16)
    body = ((rows - size / 2) / (0.42 * size)) ** 2 + ((columns - size / 2) / (0.46 * size)) ** 2 < 1
    slice_[body] = 40
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        lungs |= ((rows - size / 2 - shift) / (0.28 * size)) ** 2 + \
                 ((columns - size / 2 - side * 0.2 * size) / (0.14 * size)) ** 2 < 1
    slice_[lungs] = -850
    return slice_, lungs


def write_lung(root, count=5, size=64):
    """2d_images/ID_<nnnn>_Z_<zzzz>.tif (int16 HU) and 2d_masks/<same>.tif (uint8 0/255), as on Kaggle."""
    root = Path(root)
    for index in range(count):
        name = f"ID_{index:04d}_Z_{140 + 3 * index:04d}"
        slice_, lungs = lung_slice(size, shift=index - count // 2)
        (root / "2d_images").mkdir(parents=True, exist_ok=True)
        (root / "2d_masks").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "2d_images" / f"{name}.tif", slice_)
        tifffile.imwrite(root / "2d_masks" / f"{name}.tif", lungs.astype(np.uint8) * 255)
    return root


# --- EM cell membranes ---------------------------------------------------------------------------

def em_slice(size, index):
    """A grey EM-like slice and its ISBI label: 255 inside cells, 0 on a membrane grid that drifts
    by one pixel per slice (neighbouring slices of a stack look alike)."""
    label = np.full((size, size), 255, np.uint8)
    for line in range(index % 8, size, 16):
        label[line:line + 2, :] = 0
        label[:, line:line + 2] = 0
    generator = np.random.default_rng(index)
    image = np.where(label == 0, 60, 190).astype(np.int16) + generator.integers(-20, 20, (size, size))
    return image.clip(0, 255).astype(np.uint8), label


def write_isbi_volume(root, pages=10, label_pages=None, size=64):
    """train-volume.tif and train-labels.tif, multi-page 8-bit TIFF stacks, as the challenge ships them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    slices = [em_slice(size, index) for index in range(max(pages, label_pages or 0))]
    # minisblack: without it tifffile stores a stack of 3 or 4 pages as one RGB(A) page
    tifffile.imwrite(root / "train-volume.tif", np.stack([image for image, _ in slices[:pages]]),
                     photometric="minisblack")
    tifffile.imwrite(root / "train-labels.tif", np.stack([label for _, label in slices[:label_pages or pages]]),
                     photometric="minisblack")
    return root


def write_isbi_slices(root, count=10, size=64):
    """The same slices one file each: images/slice<i>.png and labels/slice<i>.tif (unpadded numbers,
    so natural order matters)."""
    root = Path(root)
    for index in range(count):
        image, label = em_slice(size, index)
        save(image, root / "images" / f"slice{index}.png")
        save(label, root / "labels" / f"slice{index}.tif")
    return root


# --- retinal OCT layers ------------------------------------------------------------------------------

def oct_bscan(height, width, seed, classes=11):
    """A grey B-scan and its label map: `classes` horizontal bands (0 above the ILM ... 10 below the
    BM) with gently sloping boundaries, each band a different grey."""
    rows, columns = np.mgrid[:height, :width]
    tops = 8 + np.arange(1, classes) * (height - 16) / classes          # boundary rows at column 0
    slope = 0.05 * (seed % 3 - 1)
    label = np.zeros((height, width), np.uint8)
    for number, top in enumerate(tops, start=1):
        label[rows >= top + slope * columns] = number
    generator = np.random.default_rng(seed)
    image = (40 + label.astype(np.int16) * 18 + generator.integers(-8, 8, (height, width))).clip(0, 255)
    return image.astype(np.uint8), label


def write_oct(root, train=("vol01_b064", "vol01_b128", "vol02_b064"), test=("vol03_b064", "vol03_b128"),
              size=(64, 96), lists=True):
    """OCT/images/<name>.png (grey B-scan), OCT/labels/<name>.png (0..10), train.txt / test.txt."""
    root = Path(root)
    for index, name in enumerate((*train, *test)):
        image, label = oct_bscan(*size, seed=index)
        save(image, root / "images" / f"{name}.png")
        save(label, root / "labels" / f"{name}.png")
    if lists:
        write_lines(root / "train.txt", train)
        write_lines(root / "test.txt", test)
    return root


# --- CHASE_DB1 retinal vessels ---------------------------------------------------------------------------

CHASE_NAMES = tuple(f"{child:02d}{eye}" for child in range(1, 15) for eye in "LR")


def vessel_fundus(height, width, seed):
    """A red fundus disc on black with three dark vessel lines; returns (image, field, first, second): the
    vessels as the first annotator draws them, and the second's, who also marks a thin fourth vessel."""
    generator = np.random.default_rng(seed)
    field = disc_mask(height, width, (height / 2, width / 2), 0.45 * min(height, width))
    first = np.zeros((height, width), bool)
    for row in (height // 3, height // 2, 2 * height // 3):
        first[row + seed % 3:row + seed % 3 + 2, width // 6:5 * width // 6] = True
    first &= field
    second = first.copy()
    second[height // 6:5 * height // 6, width // 2] = True
    second &= field
    image = np.zeros((height, width, 3), np.uint8)
    image[field] = (150, 60, 25)
    image[first] = (70, 20, 10)
    noise = generator.integers(0, 10, size=image.shape, dtype=np.uint8)
    return np.where(field[..., None], image + noise, image).astype(np.uint8), field, first, second


def write_chase(root, names=CHASE_NAMES, size=(48, 50)):
    """CHASE_DB1 as distributed, one flat folder: Image_01L.jpg (RGB JPEG), Image_01L_1stHO.png and
    Image_01L_2ndHO.png (1-bit PNGs, as the real masks are), ... Image_14R; 999 x 960 there, tiny here."""
    root = Path(root)
    height, width = size
    for index, name in enumerate(names):
        image, _, first, second = vessel_fundus(height, width, seed=index)
        save(image, root / f"Image_{name}.jpg")
        save(first, root / f"Image_{name}_1stHO.png")    # a bool array is saved as a mode "1" (1-bit) PNG
        save(second, root / f"Image_{name}_2ndHO.png")
    return root


# --- Drishti-GS1 optic disc and cup ------------------------------------------------------------------------

DRISHTI_TRAIN = ("drishtiGS_002", "drishtiGS_004")
DRISHTI_TEST = ("drishtiGS_001", "drishtiGS_003")
DRISHTI_EXPERTS = 4


def soft_map(height, width, centre, radii):
    """An 8-bit soft map as Drishti-GS1 stores it: per pixel the fraction of experts who marked it, x 255
    (0, 64, 128, 191, 255 for 0 ... 4 of 4), expert k drawing a disc of radii[k]."""
    votes = sum(disc_mask(height, width, centre, radius).astype(np.float32) for radius in radii)
    return np.round(votes / len(radii) * 255).astype(np.uint8)


def drishti_centre(height, width, index):
    """Near where Drishti-GS1's discs sit (about 0.54 of the height, 0.49 of the width), a little apart."""
    return (round(0.54 * height) + 3 * index - 4, round(0.49 * width) + 4 * index - 6)


def write_drishti(root, train=DRISHTI_TRAIN, test=DRISHTI_TEST, size=(112, 128)):
    """The official Drishti-GS1_files layout: Training/Images/<name>.png, Training/GT/<name>/SoftMap/
    <name>_ODsegSoftmap.png and <name>_cupsegSoftmap.png (8-bit grey soft maps), <name>_cdrValues.txt; the
    same under Test/ with Test/Test_GT/. Four experts draw the disc with radii 13 ... 16 and the cup with
    5 ... 8, so the soft map's >= 0.5 region (2 of 4) is the third expert's: disc radius 15, cup radius 7."""
    root = Path(root)
    height, width = size
    for index, name in enumerate((*train, *test)):
        folder, gt_folder = ("Training", "GT") if name in train else ("Test", "Test_GT")
        centre = drishti_centre(height, width, index)
        image, _ = fundus(height, width, centre, 15, seed=200 + index)
        save(image, root / folder / "Images" / f"{name}.png")
        maps = root / folder / gt_folder / name / "SoftMap"
        save(soft_map(height, width, centre, (13, 14, 15, 16)), maps / f"{name}_ODsegSoftmap.png")
        save(soft_map(height, width, centre, (5, 6, 7, 8)), maps / f"{name}_cupsegSoftmap.png")
        write_lines(root / folder / gt_folder / name / f"{name}_cdrValues.txt", ["0.50 0.45 0.48 0.47"])
    return root


# --- MoNuSeg nuclei --------------------------------------------------------------------------------------

MONUSEG_TRAIN = ("TCGA-A1-0001-01Z-00-DX1", "TCGA-A1-0002-01Z-00-DX1")
MONUSEG_TEST = ("TCGA-B2-0003-01Z-00-DX1", "TCGA-B2-0004-01Z-00-DX1")
MONUSEG_UNANNOTATED = ("TCGA-C3-0005-01Z-00-DX1",)


def monuseg_outlines(shift=0):
    """Three nucleus outlines (X, Y) vertex lists, the tile's column and row: a 20 x 16 rectangle, a 16 x 12
    one overlapping its lower right corner by 6 x 6 pixels, and apart from both a right triangle with legs of
    20. `shift` moves all three right."""
    first = [(10, 10), (30, 10), (30, 26), (10, 26)]
    second = [(24, 20), (40, 20), (40, 32), (24, 32)]
    triangle = [(60, 40), (80, 40), (60, 60)]
    return [[(x + shift, y) for x, y in outline] for outline in (first, second, triangle)]


def monuseg_truth(shape, shift=0):
    """The instance map a reader must make of `monuseg_outlines` (drawn here by hand, not by a rasteriser):
    pixel centres inside, top and left edges in, bottom and right out; where the rectangles overlap the smaller
    (id 2) keeps the pixels. Areas: 320 - 36 = 284, 192, and 20 + 19 + ... + 1 = 210."""
    truth = np.zeros(shape, np.int32)
    truth[10:26, 10 + shift:30 + shift] = 1
    truth[20:32, 24 + shift:40 + shift] = 2
    rows, columns = np.mgrid[:shape[0], :shape[1]]
    truth[(rows >= 40) & (rows < 60) & (columns >= 60 + shift) & (columns < 120 + shift - rows)] = 3
    return truth


def aperio_xml(outlines):
    """Aperio ImageScope XML as the MoNuSeg archives hold it: one <Region> of <Vertices> per outline."""
    regions = []
    for number, outline in enumerate(outlines, start=1):
        vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in outline)
        regions.append(f'<Region Id="{number}" Type="0" Zoom="1" Text="" NegativeROA="0"><Attributes/>'
                       f'<Vertices>{vertices}</Vertices></Region>')
    return ('<Annotations MicronsPerPixel="0.252700"><Annotation Id="1" Type="4" LineColor="65280"><Attributes/>'
            '<Regions><RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>'
            + "".join(regions) + '</Regions><Plots/></Annotation></Annotations>\n')


def he_tile(truth, seed):
    """A pink H&E-like tile with dark purple nuclei where `truth` is nonzero."""
    generator = np.random.default_rng(seed)
    image = np.empty((*truth.shape, 3), np.uint8)
    image[:] = (230, 170, 200)
    image[truth > 0] = (90, 40, 130)
    noise = generator.integers(0, 16, size=image.shape, dtype=np.uint8)
    return (image - noise).astype(np.uint8)


def write_monuseg(root, train=MONUSEG_TRAIN, test=MONUSEG_TEST, unannotated=MONUSEG_UNANNOTATED, size=(80, 96)):
    """The official archives unpacked side by side: 'MoNuSeg 2018 Training Data/Tissue Images/<tile>.tif' with
    'MoNuSeg 2018 Training Data/Annotations/<tile>.xml', and 'MoNuSegTestData/<tile>.tif' beside its .xml
    (1000 x 1000 tiles there, `size` here). The `unannotated` training tiles have no XML, as in copies that
    lack some. Tile k's outlines are `monuseg_outlines(shift=2 * k)`."""
    root = Path(root)
    training = root / "MoNuSeg 2018 Training Data"
    places = [(name, training / "Tissue Images", training / "Annotations") for name in (*train, *unannotated)]
    places += [(name, root / "MoNuSegTestData", root / "MoNuSegTestData") for name in test]
    for index, (name, tile_folder, xml_folder) in enumerate(places):
        save(he_tile(monuseg_truth(size, shift=2 * index), seed=300 + index), tile_folder / f"{name}.tif")
        if name not in unannotated:
            xml_folder.mkdir(parents=True, exist_ok=True)
            (xml_folder / f"{name}.xml").write_text(aperio_xml(monuseg_outlines(shift=2 * index)))
    return root
