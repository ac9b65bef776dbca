"""Segmentation metrics, usable on their own: numpy masks / id maps (or COCO RLEs) in, numbers out.

One module per metric family, each matching the named official code (tests compare them with
transcriptions of the reference formulas, or with pycocotools itself):

  panoptic   PQ / SQ / RQ (panopticapi pq_compute), VPQ (VIPSeg)          `PQStats`, `pq_stats`, `VPQ`
  semantic   mIoU (one confusion matrix, ignore 255), mVC (VSPW)          `ConfusionMatrix`, `VideoConsistency`
  coco       mask AP / AP50 (pycocotools), YouTube-VIS track AP            `MaskAP`, `VideoMaskAP`
  referring  cIoU / gIoU (LISA), interactive cIoU / mIoU                   `MaskIoU`
  davis      J, F, J&F (davis2017-evaluation) and X2SAM's pooled variant   `JF`, `j_measure`, `f_measure`
  gcg        METEOR / CIDEr (pycocoevalcap), AP50, mIoU, recall (GLaMM)    `GCG`
             video GCG: METEOR / CIDEr, mIoU, recall over clips (X2SAM)    `VideoGCG`
"""

from x2sam_jax.eval.metrics.coco import MaskAP, VideoMaskAP, track_iou
from x2sam_jax.eval.metrics.davis import JF, f_measure, j_measure
from x2sam_jax.eval.metrics.gcg import GCG, VideoGCG, caption_scores
from x2sam_jax.eval.metrics.panoptic import VPQ, PQStats, pq_stats, vpq_stats
from x2sam_jax.eval.metrics.referring import MaskIoU
from x2sam_jax.eval.metrics.semantic import ConfusionMatrix, VideoConsistency

__all__ = ["MaskAP", "VideoMaskAP", "track_iou", "JF", "f_measure", "j_measure", "GCG", "VideoGCG", "caption_scores",
           "VPQ", "PQStats", "pq_stats", "vpq_stats", "MaskIoU", "ConfusionMatrix", "VideoConsistency"]
