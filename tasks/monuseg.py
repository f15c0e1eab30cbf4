"""MoNuSeg nuclei instance segmentation (MICCAI 2018 Multi-Organ Nucleus Segmentation challenge; Kumar et al.,
IEEE TMI 2017; FullNet's nuclei task): reader of the organisers' archives, rasterisation of their nucleus
outlines, and the field's scores.

Layout (both official archives unpacked under one data root):

    MoNuSeg 2018 Training Data/Tissue Images/<tile>.tif   30 H&E tiles, 1000 x 1000 RGB
    MoNuSeg 2018 Training Data/Annotations/<tile>.xml     their nucleus outlines
    MoNuSegTestData/<tile>.tif, <tile>.xml                 14 test tiles, outlines beside them

Each annotation is Aperio ImageScope XML: one <Region> per nucleus, its outline the polygon of the region's
<Vertices><Vertex X=".." Y=".."/>... in pixel coordinates. The reader turns the outlines into an instance map
(one id per nucleus); the network learns nucleus vs background from instance map > 0, and varCE takes its
instances from the same map, so touching nuclei stay two instances there.
"""
import math
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import expand_labels, find_boundaries

from errors import UserError
from metrics import ObjectPairs, dice_coefficient, object_scores
from tasks.files import files_by_stem, read_image
from tasks.glas import MIN_NUCLEUS_AREA, nuclei_from_probability, numbered_components, \
    split_touching_nuclei
from tasks.sample import Dataset, Sample

TRAIN_IMAGES = Path("MoNuSeg 2018 Training Data") / "Tissue Images"
TRAIN_ANNOTATIONS = Path("MoNuSeg 2018 Training Data") / "Annotations"
TEST_FOLDER = Path("MoNuSegTestData")
TILE_SUFFIXES = (".tif", ".tiff", ".png")
# POSTPROCESS for nuclei: "watershed" cuts touching predicted nuclei apart with a seeded watershed
# (tasks.glas.split_touching_nuclei); "none", the default, is FullNet's post-processing, which has no such step.
NUCLEUS_POSTPROCESSINGS = ("none", "watershed")


# --- which files -----------------------------------------------------------------------------------

def read_monuseg(root, split, options):
    """The training tiles that have their outlines ("train"), or every test tile ("test")."""
    pairs = train_pairs(Path(root)) if split == "train" else test_pairs(Path(root))
    return [read_tile(name, image, annotation) for name, image, annotation in pairs]


def read_monuseg_contour(root, split, options):
    """read_monuseg with FullNet's three classes as the label: 0 background, 1 inside, 2 contour
    (contour_labels); the instance map stays the whole nuclei, which scoring compares against."""
    samples = read_monuseg(root, split, options)
    for sample in samples:
        sample.label = contour_labels(sample.instances)
    return samples


def layout_folder(root, relative, what):
    folder = root / relative
    if not folder.is_dir():
        raise UserError(f"MoNuSeg {what} folder {folder} not found; unpack the official archive so that {root} "
                        f"holds '{relative}' (layout: docs/datasets.md), or pass --data-root PATH")
    return folder


def tiles_in(folder):
    tiles = files_by_stem(folder, TILE_SUFFIXES)
    if not tiles:
        raise UserError(f"no tiles ({', '.join(TILE_SUFFIXES)}) in {folder}")
    return tiles


def train_pairs(root):
    """(name, tile, outlines) of each training tile with a same-name .xml in Annotations. Copies in circulation
    lack some annotations; training on the others is still training, so a missing one is a warning, not an
    error, but no annotation at all is."""
    image_folder = layout_folder(root, TRAIN_IMAGES, "training tiles")
    annotation_folder = layout_folder(root, TRAIN_ANNOTATIONS, "training annotations")
    tiles = tiles_in(image_folder)
    annotations = files_by_stem(annotation_folder, (".xml",))
    missing = [name for name in tiles if name not in annotations]
    if len(missing) == len(tiles):
        raise UserError(f"none of the {len(tiles)} training tiles in {image_folder} has its outlines in "
                        f"{annotation_folder} (expected e.g. {annotation_folder / (missing[0] + '.xml')})")
    if missing:
        print(f"warning: {len(missing)} of {len(tiles)} MoNuSeg training tiles have no annotation in "
              f"{annotation_folder} (e.g. {missing[0]}.xml); training on the {len(tiles) - len(missing)} that do",
              file=sys.stderr)
    return [(name, path, annotations[name]) for name, path in tiles.items() if name in annotations]


def test_pairs(root):
    """(name, tile, outlines) of every test tile: each must have its .xml beside it, since the test scores
    are means over all 14 tiles."""
    folder = layout_folder(root, TEST_FOLDER, "test")
    tiles = tiles_in(folder)
    annotations = files_by_stem(folder, (".xml",))
    for name, path in tiles.items():
        if name not in annotations:
            raise UserError(f"test tile {path} has no outlines: expected {folder / (name + '.xml')} beside it; "
                            f"restore it from the MoNuSegTestData archive")
    return [(name, path, annotations[name]) for name, path in tiles.items()]


# --- outlines to instances -------------------------------------------------------------------------------

def read_tile(name, image_path, annotation_path):
    image = read_image(image_path)
    instances = rasterise(read_outlines(annotation_path), image.shape[:2])
    return Sample(name, image, (instances > 0).astype(np.uint8), instances=instances)


def read_outlines(path):
    """[(xs, ys)] float64 arrays of each <Region>'s vertices, in file order. A region of fewer than three
    vertices encloses nothing and is skipped (the official training set has two such); a file with no outline
    at all is an error, since its tile would train as nucleus-free."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise UserError(f"annotation {path} is not well-formed XML ({error}); replace it with the file from "
                        f"the MoNuSeg archive")
    except OSError as error:
        raise UserError(f"cannot read annotation {path} ({error.strerror or error}); check the file's permissions")
    outlines, skipped = [], 0
    for region in root.iter("Region"):
        vertices = region.findall("./Vertices/Vertex")
        if len(vertices) < 3:
            skipped += 1
            continue
        outlines.append(vertex_arrays(vertices, region, path))
    if not outlines:
        raise UserError(f"annotation {path} has no nucleus outline (no <Region> with 3 or more <Vertex X= Y=> "
                        f"under <Vertices>); replace it with the file from the MoNuSeg archive")
    if skipped:
        print(f"notice: {path.name}: {skipped} region(s) of fewer than 3 vertices enclose no pixel; skipped",
              file=sys.stderr)
    return outlines


def vertex_arrays(vertices, region, path):
    try:
        points = np.array([(float(vertex.attrib["X"]), float(vertex.attrib["Y"])) for vertex in vertices])
    except (KeyError, ValueError):
        raise UserError(f"annotation {path}: region {region.get('Id', '?')} has a <Vertex> without numeric X and "
                        f"Y attributes; replace the file with the one from the MoNuSeg archive")
    if not np.isfinite(points).all():
        raise UserError(f"annotation {path}: region {region.get('Id', '?')} has a non-finite vertex coordinate")
    return points[:, 0], points[:, 1]


def rasterise(outlines, shape):
    """(H, W) int32 instance map of the outlines, ids 1..n in file order, 0 = background.

    Overlaps: where outlines overlap, the smaller one (fewer pixels) wins, and of two equal ones the later in
    the file: outlines are painted largest first, so a small nucleus drawn across a large one keeps its pixels
    instead of vanishing under its neighbour. Outlines left with no pixel (enclosing no pixel centre, or wholly
    covered) drop out, and the ids are renumbered 1..n without gaps."""
    pixels = [outline_pixels(xs, ys, shape) for xs, ys in outlines]
    areas = np.array([rows.size for rows, _ in pixels])
    instances = np.zeros(shape, np.int32)
    for index in paint_order(areas):
        rows, columns = pixels[index]
        instances[rows, columns] = index + 1
    values, numbered = np.unique(instances, return_inverse=True)
    numbered = numbered.reshape(shape).astype(np.int32)
    return numbered if values[0] == 0 else numbered + 1


# Width (px) of the contour class, the band inside each nucleus along its outline. Touching nuclei are then
# parted by two bands (4 px) of contour, and a predicted inside grown back by this width is the whole nucleus.
CONTOUR_WIDTH = 2
INSIDE, CONTOUR = 1, 2


def contour_labels(instances, width=CONTOUR_WIDTH):
    """(H, W) uint8 class map of an instance map: CONTOUR for the pixels of a nucleus within `width` steps
    (4-connected) of a pixel that is not of the same nucleus, INSIDE for the rest of it, 0 for background. The
    image edge is not an outline: a nucleus cut by it keeps its inside there."""
    labels = (instances > 0).astype(np.uint8) * INSIDE
    remaining = np.pad(instances, 1, mode="edge")
    for _ in range(width):
        band = find_boundaries(remaining, mode="inner") & (remaining > 0)
        labels[band[1:-1, 1:-1]] = CONTOUR
        remaining = np.where(band, 0, remaining)
    return labels


def paint_order(areas):
    """Indices largest area first; among equal areas file order, so the later one is painted over the earlier."""
    return np.lexsort((np.arange(len(areas)), -areas))


def outline_pixels(xs, ys, shape):
    """(rows, columns) of the pixels of an (H, W) grid whose centres lie inside the closed polygon (xs, ys).

    Vertex (X, Y) is column X, row Y, pixel centres at integer coordinates. Scanline rule, even-odd: row r meets
    the edges with min(y0, y1) <= r < max(y0, y1), and between the k-th and (k+1)-th crossing x_a <= x_b (k
    even) it covers the columns x_a <= c < x_b. A centre exactly on the outline therefore counts on a top or
    left edge and not on a bottom or right one, so two outlines sharing an edge never both claim a pixel, and
    an axis-parallel rectangle of W x H pixel units covers W x H pixels: the count follows the polygon's area.
    Parts outside the grid are cut off."""
    height, width = shape
    following_x, following_y = np.roll(xs, -1), np.roll(ys, -1)
    first, stop = max(math.ceil(ys.min()), 0), min(math.ceil(ys.max()), height)
    if stop <= first:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    rows = np.arange(first, stop)
    at = row_crossings(xs, ys, following_x, following_y, rows.astype(np.float64)[:, None])
    starts = np.ceil(at[:, 0::2]).clip(0, width)   # no crossing: inf, clipped to an empty run at the edge
    ends = np.ceil(at[:, 1::2]).clip(0, width)
    lengths = np.maximum(ends - starts, 0).astype(np.intp)
    run_rows = np.repeat(np.broadcast_to(rows[:, None], lengths.shape).ravel(), lengths.ravel())
    run_starts = np.repeat(starts.ravel().astype(np.intp), lengths.ravel())
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths.ravel()) - lengths.ravel(), lengths.ravel())
    return run_rows, run_starts + offsets


def row_crossings(x0, y0, x1, y1, rows):
    """(R, 2k) sorted x of the edges (x0, y0) -> (x1, y1) crossing each row, inf where a row has fewer; an even
    number per row, since a closed outline is crossed as often going down as going up."""
    crosses = (np.minimum(y0, y1) <= rows) & (rows < np.maximum(y0, y1))  # horizontal edges never cross
    rising = y1 - y0
    slope = np.divide(x1 - x0, rising, out=np.zeros_like(rising), where=rising != 0)
    at = np.where(crosses, x0 + (rows - y0) * slope, np.inf)
    at.sort(axis=1)
    if at.shape[1] % 2:
        at = np.concatenate([at, np.full((len(at), 1), np.inf)], axis=1)
    return at


# --- scores ----------------------------------------------------------------------------------------

def predicted_nuclei(prob, threshold, postprocess="none"):
    """The (H, W) instance map scored for a probability map: of a (1, H, W) nucleus probability,
    tasks.glas.nuclei_from_probability; of a (3, H, W) background / inside / contour one, nuclei_from_insides.
    Touching nuclei are cut apart first when `postprocess` is "watershed"."""
    if postprocess not in NUCLEUS_POSTPROCESSINGS:
        raise UserError(f"--postprocess {postprocess} is for isbi2012's membranes; nuclei take "
                        f"{' or '.join(NUCLEUS_POSTPROCESSINGS)}")
    split = postprocess == "watershed"
    if len(prob) == 3:
        return nuclei_from_insides(prob, split_touching=split)
    return nuclei_from_probability(prob, threshold, split_touching=split)


def nuclei_from_insides(prob, min_area=MIN_NUCLEUS_AREA, split_touching=False, width=CONTOUR_WIDTH):
    """FullNet's post-processing of a three-class prediction: the pixels whose most likely class is INSIDE, holes
    filled, 8-connected components under `min_area` px dropped, the rest numbered and each grown by `width` px
    (Euclidean, never into a neighbour: skimage's expand_labels) to give back the contour band."""
    classes = torch.as_tensor(prob).argmax(0).cpu().numpy()
    insides = ndimage.binary_fill_holes(classes == INSIDE)
    instances = numbered_components(insides, min_area)
    if split_touching:
        instances = split_touching_nuclei(instances > 0)
    return expand_labels(instances, distance=width)


def nucleus_mask(prob, threshold, postprocess="none"):
    """(H, W) bool: the predicted nuclei as scored, where two of them touch parted by a 1-px line, so a mask that
    predict.py writes shows what test.py counts."""
    instances = predicted_nuclei(prob, threshold, postprocess)
    return (instances > 0) & ~touching_side(instances)


def touching_side(instances):
    """(H, W) bool: the pixels of a nucleus with a 4-neighbour of another nucleus of lower id: one side of
    every contact, so removing them parts two nuclei by one pixel."""
    padded = np.pad(instances, 1)
    centre = padded[1:-1, 1:-1]
    height, width = instances.shape
    touching = np.zeros(instances.shape, bool)
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        neighbour = padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        touching |= (neighbour > 0) & (neighbour < centre)
    return touching


def score_nuclei(prob, sample, threshold, postprocess="none"):
    """The field's nucleus scores of one tile: AJI, object F1, object Dice, object Hausdorff (pixels) of the
    predicted instance map (predicted_nuclei) against the rasterised outlines, and the pixel Dice of nucleus
    vs background."""
    predicted = predicted_nuclei(prob, threshold, postprocess)
    row = object_scores(predicted, sample.instances)
    row["pixel Dice"] = float(dice_coefficient(predicted > 0, sample.instances > 0))
    return row, None


# Colours of the nuclei picture: outlines of the annotated and the predicted nuclei, and the two errors that cost
# AJI and object F1 most.
TRUE_OUTLINE = np.array([255, 230, 0], np.float32)
PREDICTED_OUTLINE = np.array([0, 255, 90], np.float32)
MERGED_COLOUR = np.array([255, 120, 0], np.float32)
MISSED_COLOUR = np.array([0, 150, 255], np.float32)


def nucleus_errors(predicted, truth):
    """(ids of predicted nuclei that cover at least half of two or more annotated nuclei: merges, ids of annotated
    nuclei of which no predicted nucleus covers half: misses), as positions in each map's sorted nonzero ids."""
    pairs = ObjectPairs(predicted, truth)
    covers_half = pairs.inner() * 2 >= pairs.real_areas[None, :]
    merging = np.flatnonzero(covers_half.sum(axis=1) >= 2) + 1
    missed = np.flatnonzero(~covers_half.any(axis=0)) + 1
    return pairs, merging, missed


def nuclei_errors_picture(prob, sample, threshold, postprocess="none"):
    """An RGB uint8 picture of the tile (dimmed) with the predicted nuclei as scored (score_nuclei), where
    predicted nuclei that merge two or more annotated ones are tinted orange, annotated nuclei that no prediction
    covers by half are tinted blue, annotated outlines drawn yellow and predicted outlines green."""
    predicted = predicted_nuclei(prob, threshold, postprocess)
    pairs, merging, missed = nucleus_errors(predicted, sample.instances)
    picture = sample.image.astype(np.float32) * 0.7
    for region, colour in ((np.isin(pairs.found, merging), MERGED_COLOUR), (np.isin(pairs.real, missed),
                                                                             MISSED_COLOUR)):
        picture[region] = 0.5 * picture[region] + 0.5 * colour
    picture[find_boundaries(pairs.real, mode="inner")] = TRUE_OUTLINE
    picture[find_boundaries(pairs.found, mode="inner")] = PREDICTED_OUTLINE
    return picture.round().astype(np.uint8)


def nuclei_pictures(prob, sample, threshold, postprocess="none"):
    """The extra picture evaluation saves per tile: {"nuclei": nuclei_errors_picture}."""
    return {"nuclei": nuclei_errors_picture(prob, sample, threshold, postprocess)}


def scoring_notes(predicted_nuclei_are):
    return ("MoNuSeg nucleus scores per test tile against the rasterised outlines (where outlines overlap the "
            f"smaller nucleus keeps the pixels): predicted nuclei are {predicted_nuclei_are} (with --postprocess "
            "watershed: then cut apart along their necks by a seeded watershed); AJI (the challenge's Aggregated "
            "Jaccard Index), object F1 (a predicted nucleus covering at least half of the nucleus it overlaps most "
            "is a hit), object Dice and object Hausdorff distance (pixels) as GlaS defines them, and pixel Dice of "
            "nucleus vs background.")


NOTES = scoring_notes("the 8-connected components of the thresholded prediction with holes filled and components "
                      f"under {MIN_NUCLEUS_AREA} px dropped")
CONTOUR_NOTES = scoring_notes(
    "the 8-connected components of the pixels most likely inside a nucleus (of background / inside / contour, the "
    f"contour being a {CONTOUR_WIDTH}-px band inside each outline), holes filled, components under "
    f"{MIN_NUCLEUS_AREA} px dropped, each grown back by {CONTOUR_WIDTH} px")

MONUSEG = Dataset(read_monuseg, num_classes=1, score=score_nuclei, notes=NOTES, extra_pictures=nuclei_pictures,
                  score_settings=("POSTPROCESS",), postprocessings=NUCLEUS_POSTPROCESSINGS,
                  predicted_mask=nucleus_mask,
                  source="MoNuSeg 2018 (Multi-Organ Nucleus Segmentation challenge), "
                         "https://monuseg.grand-challenge.org/Data/")

MONUSEG_CONTOUR = Dataset(read_monuseg_contour, num_classes=3, score=score_nuclei, notes=CONTOUR_NOTES,
                          extra_pictures=nuclei_pictures, score_settings=("POSTPROCESS",),
                          postprocessings=NUCLEUS_POSTPROCESSINGS, source=MONUSEG.source, scores_like="monuseg")
