"""Named recipes: sets of constants.py overrides, picked with ``--recipe NAME`` (or RECIPE = "NAME").

Command-line flags still win over a recipe, so ``--recipe cpu --epochs 10`` is the cpu recipe, shorter.
The paper's recipe is constants.py itself (``faithful``).
"""

CPU = {"PATCH_SIZE": 256, "BATCH_SIZE": 4, "AUGMENT": "flips", "OPTIMIZER": "adamw", "LR": 2e-3, "WARMUP_STEPS": 30,
       "LOSS": "dice_bce", "EPOCHS": 280, "PRETRAINED": "none", "PREPROCESS": "clahe"}

RECIPES = {
    "faithful": {},
    "faithful_code": {"PREPROCESS": "authors", "AUGMENT": "authors_code", "OPTIMIZER": "adamw", "LR": 2e-4,
                      "WEIGHT_DECAY": 0.0, "POLY_POWER": 0.0, "LOSS": "bce"},
    "hires": {"IMAGE_SIZE": 576, "EPOCHS": 1000},
    "hires_dice_bce": {"IMAGE_SIZE": 576, "EPOCHS": 1000, "LOSS": "dice_bce"},
    "cpu": CPU,
    "cpu_camera": {**CPU, "AUGMENT": "camera"},
    "cpu_disc": {"IMAGE_SIZE": 320, "PATCH_SIZE": 0, "BATCH_SIZE": 4, "AUGMENT": "paper", "OPTIMIZER": "adamw",
                 "LR": 2e-3, "WARMUP_STEPS": 30, "LOSS": "dice_bce", "EPOCHS": 50, "PRETRAINED": "none"},
    "cpu_nuclei": {**CPU, "AUGMENT": "paper", "PREPROCESS": "ours", "EPOCHS": 350},
}

RECIPE_WHY = {
    "faithful": "constants.py as shipped, i.e. the paper: 448x448, 300 epochs (900 steps of batch 8 on the "
                "20 training images), SGD momentum 0.9, poly LR from 4e-3, Dice loss.",
    "faithful_code": "the authors' released code where it differs from the paper: their preprocessing (BGR, "
                     "x/255*3.2-1.6), their augmentation (each transform with probability 0.5, aspect jitter, "
                     "colour before the warp), Adam at a constant 2e-4 without weight decay (AdamW with decay 0 "
                     "is Adam), and BCE (their dice_bce_loss returns BCE only). Not reproduced: their halving of "
                     "the LR after 10 epochs without a lower epoch loss (reloading the best weights), the early "
                     "stop after 20, the short last batch of each epoch, and the hue wrap-around of their uint8 "
                     "HSV code.",
    "hires": "DRIVE images are 565x584; 448 shrinks them by about 0.78 and the 1-2 px capillaries fall below a "
             "pixel. 576, the nearest multiple of 32 above native, resizes by 1.02/0.99 instead. Where the encoder "
             "has to start from random weights (no ImageNet weights), 900 steps is short: 1000 epochs = 3000 "
             "steps. Loss unchanged (Dice).",
    "hires_dice_bce": "hires plus a BCE term beside Dice. Dice alone drives probabilities to 0/1, which ranks "
                      "pixels coarsely and can cost AUC; the BCE term keeps per-pixel probabilities "
                      "calibrated. Its own recipe, so each change is measured alone.",
    "cpu": "Made for about 40 minutes of a 2-core CPU, from random weights. Random 256x256 crops at native "
           "resolution keep the 1-2 px capillaries that a resize to 448 thins, and cost a fifth of a 448x448 image "
           "each; the test image is predicted whole at native resolution. AdamW at 2e-3 with a 30-step warm-up "
           "moves a randomly initialised network in hundreds of steps, where the paper's SGD at 4e-3 (tuned for "
           "ImageNet weights) barely leaves its start. Dice + BCE keeps probabilities graded, which AUC rewards. "
           "Batch 4 gives twice the updates of batch 8 for the same pixels, and the 8 flips alone (exact copies "
           "of a labelled image) are the augmentation a short, under-fitted run learns from fastest: against "
           "batch 8 with the paper's augmentation for the same time, FOV AUC rose from 0.959 to 0.970. "
           "CLAHE of each colour channel (not in the paper) hands the network the capillaries' local contrast "
           "it would otherwise spend its few steps learning: in 400-step runs it raised FOV AUC from 0.960 to "
           "0.969 and F1 from 0.764 to 0.787, where predicting at 1.5x (--patch-scale 1.5) lowered them. "
           "280 epochs = 1400 steps of batch 4: about 40 minutes in fp32 at 1.6-1.7 s a step (2-core AMD EPYC, "
           "AVX2), about 20 minutes in bf16 at 0.87 s a step (2-core AMD EPYC with AVX-512 BF16, where AMP "
           "trains in bf16).",
    "cpu_camera": "The cpu recipe for a vessel model meant to meet other cameras (predict.py on a user's fundus "
                  "photographs, test.py --dataset chase): the same crops, steps, optimiser and loss, with the "
                  "paper's transforms instead of the flips alone and the scale widened to 1/1.5-1.5 "
                  "(AUGMENT camera). Carried to CHASE_DB1 unchanged, the flips-only model found 10 % of the "
                  "vessels at native scale, 36 % with the FOV diameters matched and 56 % with the field angles "
                  "matched too: it knows DRIVE's vessel widths only. The two matching rules' scales differ by a "
                  "factor of 1.5 (0.59 against 0.39), which is the range given to the augmentation; nothing "
                  "was tuned on CHASE_DB1's labels, and the recipe was fixed before any figure of it was seen.",
    "cpu_disc": "The cpu recipe's optimiser and loss for the optic disc (drishti, origa, messidor, rimone), whose "
                "target is one large blob, not 1-px lines: the disc crop (CROP_SIZE) is resized whole to 320x320, "
                "as the paper resizes it to 448, since a 256 crop at native resolution would not hold the whole "
                "disc (320-520 px tall, median 380, in Drishti-GS1's 50 training images). At 320 a pixel is 2.5 px "
                "of the 800 crop, and the probabilities are upsampled to the crop before thresholding, so the "
                "boundary still falls between those pixels; a step costs about half of one at 448. The paper's "
                "augmentation (flips, 90-110 % scaling, shift, HSV jitter): a disc has no fine structure for the "
                "resampling to blur, and cameras differ in colour. No CLAHE: the disc is the brightest region "
                "already. 50 epochs = 650 steps of batch 4 on Drishti-GS1's 50 training images.",
    "cpu_nuclei": "The cpu recipe for nuclei in H&E tiles (monuseg): the same 256x256 crops at native resolution, "
                  "batch 4, AdamW 2e-3 with warm-up, Dice + BCE, random initialisation, with two changes made "
                  "before any nucleus figure was seen. The paper's augmentation instead of the flips alone: the "
                  "test tiles come from other hospitals and organs, and the HSV jitter stands in for stain "
                  "colour that differs between them, while a nucleus (about 20 px across) has no 1-px structure "
                  "for the 90-110 % scaling to blur. No CLAHE: it equalises each colour channel on its own and "
                  "shifts the haematoxylin/eosin balance the nuclei are seen by. 350 epochs = 1400 steps on the "
                  "13 annotated tiles of the GitHub copy (4 steps an epoch; 2800 steps on the official 30). "
                  "FullNet (--model fullnet) keeps every feature map at full resolution and costs about 25 times "
                  "as much per pixel (4.4-4.9 s a step on four 128-px crops against 0.735 s on four 256-px ones, "
                  "bf16 on a 2-core AMD EPYC with AVX-512 BF16): run it with --patch-size 128 and the epochs "
                  "that give it CE-Net's training time (55 there), and, as its authors train it, at a constant "
                  "--lr 1e-3 --poly-power 0 (880 steps of inside / contour varCE: AJI 0.481 and, in a second run, "
                  "0.423, against 0.383 with the poly decay), and end with a decay: 1760 constant steps then 220 "
                  "more with --init-weights <its final.pth> --epochs 55 --poly-power 1 reached AJI 0.532 (0.490 "
                  "before the decay; after 880 constant steps the same decay gave 0.471 and 0.482 in two runs, "
                  "and with --loss ce instead of varce 0.550; docs/datasets.md).",
}
