"""The 40 EEG-ImageNet classes (Spampinato et al. 2017): WordNet id -> ImageNet-1k class name.

``EEG_IMAGENET_WNIDS`` is the label index order of the released files' ``labels`` list
(0 = n02389026 sorrel ... 39 = n02124075 Egyptian cat). The reader never relies on this order — it
reads ``labels`` from the file — but the synthetic twin writes it, so the twin's files look like the
real ones.
"""

EEG_IMAGENET_WNIDS: tuple[str, ...] = (
    "n02389026", "n03888257", "n03584829", "n02607072", "n03297495",
    "n03063599", "n03792782", "n04086273", "n02510455", "n11939491",
    "n02951358", "n02281787", "n02106662", "n04120489", "n03590841",
    "n02992529", "n03445777", "n03180011", "n02906734", "n07873807",
    "n03773504", "n02492035", "n03982430", "n03709823", "n03100240",
    "n03376595", "n03877472", "n03775071", "n03272010", "n04069434",
    "n03452741", "n03792972", "n07753592", "n13054560", "n03197337",
    "n02504458", "n02690373", "n03272562", "n04044716", "n02124075",
)

CLASS_NAMES: dict[str, str] = {
    "n02106662": "German shepherd",
    "n02124075": "Egyptian cat",
    "n02281787": "lycaenid butterfly",
    "n02389026": "sorrel",
    "n02492035": "capuchin",
    "n02504458": "African elephant",
    "n02510455": "giant panda",
    "n02607072": "anemone fish",
    "n02690373": "airliner",
    "n02906734": "broom",
    "n02951358": "canoe",
    "n02992529": "cellular telephone",
    "n03063599": "coffee mug",
    "n03100240": "convertible",
    "n03180011": "desktop computer",
    "n03197337": "digital watch",
    "n03272010": "electric guitar",
    "n03272562": "electric locomotive",
    "n03297495": "espresso maker",
    "n03376595": "folding chair",
    "n03445777": "golf ball",
    "n03452741": "grand piano",
    "n03584829": "iron",
    "n03590841": "jack-o'-lantern",
    "n03709823": "mailbag",
    "n03773504": "missile",
    "n03775071": "mitten",
    "n03792782": "mountain bike",
    "n03792972": "mountain tent",
    "n03877472": "pajama",
    "n03888257": "parachute",
    "n03982430": "pool table",
    "n04044716": "radio telescope",
    "n04069434": "reflex camera",
    "n04086273": "revolver",
    "n04120489": "running shoe",
    "n07753592": "banana",
    "n07873807": "pizza",
    "n11939491": "daisy",
    "n13054560": "bolete",
}

assert len(EEG_IMAGENET_WNIDS) == 40 and set(EEG_IMAGENET_WNIDS) == set(CLASS_NAMES)
