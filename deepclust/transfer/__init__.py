"""Transfer of a trained backbone to Pascal VOC: detection (Faster R-CNN), segmentation (FCN, DeepLabV3) and
multi-label classification fine-tuning (``deepclust transfer``), and the backbone under Detectron2's and
mmdetection's names (``deepclust export --format detectron2 | mmdetection``)."""
