"""NVIDIA DALI pipelines for ImageNet-layout JPEG folders.

Training: sharded ``fn.readers.file`` over a permutation drawn from the run's seed and the epoch,
``fn.decoders.image_random_crop`` (``mixed`` on a GPU, ``cpu`` without one; area [0.08, 1], aspect
[3/4, 4/3]), resize to the crop size, random flip, ``crop_mirror_normalize`` with
``output_layout="HWC"``, so the batch is an NCHW channels-last view with no extra copy.
With ``--auto-augment`` the uint8 crop goes through DALI's own policy (``nvidia.dali.auto_aug``:
``rand_augment``, ``trivial_augment_wide``, ``auto_augment_image_net``; on the GPU in mixed mode,
on the CPU otherwise) before the normalisation, and with ``--random-erasing`` the normalised image
gets one box of zeros (the mean colour) with that probability (``fn.erase``, the box drawn as
torchvision's RandomErasing draws it, with DALI's random ops); both need DALI's conditionals.
Validation: resize the shorter side, centre crop; every image exactly once across processes.
Without a GPU (``device_id=None``) the same pipeline runs on the CPU.

Mid-epoch resume: training pipelines are built with DALI's checkpointing on. ``checkpoint()``
returns the serialized state after the batches consumed so far (the reader's position in the shard
and the state of every random generator: the crop and flip draws), and a loader built with
``checkpoint=`` continues from there with exactly the batches, crops and flips the uninterrupted
epoch would have produced (DALI restores the state; the prefetched batches are not counted), the
automatic-augmentation and erasing draws included."""
from __future__ import annotations

import itertools

import torch

from afd_fast.data.augment import ERASE_SCALE, LOG_RATIO, Preparation
from afd_fast.data.folder import BadDataError, FileList, decode_problems
from afd_fast.data.loaders import IMAGENET_MEAN, IMAGENET_STD, Loaders, calibration_indices

MEAN_255, STD_255 = [m * 255 for m in IMAGENET_MEAN], [s * 255 for s in IMAGENET_STD]
_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DALILoader:
    """Iterable of ``(images [B, 3, H, W] channels-last, labels [B] int64)`` for one process's shard."""

    def __init__(self, file_list: FileList, prep: Preparation | int, batch_size: int, train: bool, seed: int = 0,
                 epoch: int = 0, shard_id: int = 0, num_shards: int = 1, device_id: int | None = None, threads: int = 4,
                 prefetch: int = 2, hw_decoder_load: float = 0.65, dtype: torch.dtype = torch.float32,
                 drop_last: bool = True, checkpoint: bytes | None = None):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import LastBatchPolicy

        self.dtype = dtype
        prep = prep if isinstance(prep, Preparation) else Preparation.of(prep)  # an int: one size for all
        gpu = device_id is not None
        file_names, file_labels = file_list.files, file_list.labels
        if train:
            # One training loader per epoch: the order is a permutation drawn from (seed, epoch), the
            # same in every process, which the reader then splits into shards; the augmentation
            # seed depends on (seed, epoch, shard). So epoch e is the same whether or not the run
            # was resumed before it.
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(file_names), generator=g).tolist()
            file_names, file_labels = [file_names[i] for i in order], [file_labels[i] for i in order]
        pipeline_seed = (seed * 1_000_003 + epoch) * 1009 + shard_id
        mean, std = MEAN_255, STD_255
        crop = prep.train_crop if train else prep.val_crop
        augment = train and prep.augmented
        erase = prep.random_erasing if train else 0.0

        @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=pipeline_seed % 2**31,
                      prefetch_queue_depth=prefetch, enable_checkpointing=train, enable_conditionals=augment,
                      checkpoint=bytes(checkpoint) if checkpoint is not None else None)
        def pipeline():
            jpegs, labels = fn.readers.file(
                files=file_names, labels=file_labels, shard_id=shard_id, num_shards=num_shards,
                stick_to_shard=True, pad_last_batch=not train, name="Reader")
            extra = {"hw_decoder_load": hw_decoder_load} if gpu else {}
            if train:
                images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                                       random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                       **extra)
                images = fn.resize(images, resize_x=crop, resize_y=crop)
                mirror = fn.random.coin_flip(probability=0.5)
                if augment and prep.policy is not None:
                    images = _auto_augment(images, prep.policy, crop)
            else:
                images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **extra)
                images = fn.resize(images, resize_shorter=prep.val_resize)
                mirror = 0
            images = fn.crop_mirror_normalize(images, dtype=getattr(types, _DTYPES[dtype]), output_layout="HWC",
                                              crop=(crop, crop), mean=mean, std=std, mirror=mirror)
            if erase > 0:
                if fn.random.coin_flip(probability=erase):  # a DALI conditional: per sample
                    images = _erase(images, crop)
            return self._outputs(images, labels.gpu() if gpu else labels, jpegs)

        self.pipe = pipeline()  # (DALI 2.4's auto_aug warns of its own fn.experimental names: harmless)
        self.pipe.build()
        start = len(file_names) * shard_id // num_shards
        self.shard_size = _shard_size(len(file_names), shard_id, num_shards)
        self.shard_files = file_names[start:start + self.shard_size]  # in the order the reader reads them
        self.batch_size, self.prefetch = batch_size, prefetch
        policy = LastBatchPolicy.DROP if train and drop_last else LastBatchPolicy.PARTIAL
        try:  # the iterator runs the first batches already
            self.iterator = self._iterator(policy)
        except RuntimeError as e:
            self._raise_if_bad_data(e, 0)
            raise

    def _outputs(self, images, labels, jpegs) -> tuple:
        """The pipeline's outputs from its decoded, augmented images, labels and encoded files."""
        return images, labels

    def _iterator(self, policy):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        return DALIGenericIterator([self.pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=policy,
                                   auto_reset=True)

    def __len__(self) -> int:
        return len(self.iterator)

    def checkpoint(self) -> bytes:
        """The training pipeline's state after the batches this iterator has handed out: build a
        loader with ``checkpoint=`` this to continue the epoch exactly from there."""
        return self.iterator.checkpoints()[0]

    def __iter__(self):
        position = 0
        try:
            for (batch,) in self.iterator:
                yield self._to_torch(batch["images"], batch["labels"])
                position += 1
        except RuntimeError as e:
            self._raise_if_bad_data(e, position)
            raise

    def _raise_if_bad_data(self, error: RuntimeError, batch: int) -> None:
        """A failure of DALI's image decoders becomes a BadDataError naming the file: the one DALI's
        message names, else the undecodable files among the batches it may have been preparing
        (the current one and the prefetched ones). Other errors (e.g. out of memory) pass."""
        message = str(error)
        if "fn.decoders." not in message:
            return
        named = [p for p in self.shard_files if p in message]
        if named:
            bad = {p: "cannot be decoded" for p in named}
        else:
            window = self.shard_files[batch * self.batch_size:(batch + self.prefetch + 2) * self.batch_size]
            bad = decode_problems(window)
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        # DALI's own words follow "encountered:" (the lines before repeat the pipeline definition)
        after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
        dali_said = after[0] if after else ""
        advice = "; leave such files out with --verify-images --skip-bad-files (a full decode check at start-up)"
        if not bad:
            raise BadDataError(f"DALI failed reading batch {batch} of this shard: {dali_said}{advice}") from error
        raise BadDataError("; ".join(f"{p!r} {why}" for p, why in bad.items())
                           + f" (DALI: {dali_said}){advice}") from error

    def _to_torch(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.permute(0, 3, 1, 2)  # HWC batch -> NCHW view, channels-last memory, no copy
        if self.dtype == torch.bfloat16:
            images = images.to(torch.bfloat16)
        return images, labels.reshape(-1).long()


class DALILoaders(Loaders):
    """A new training pipeline per epoch (its order and seeds follow the epoch); one validation pipeline."""

    backend = "dali"

    def __init__(self, train_list: FileList, val_list: FileList, prep: Preparation, batch_size: int, seed: int,
                 rank: int, world: int, options: dict):
        self.train_list, self.prep, self.batch_size = train_list, prep, batch_size
        self.seed, self.rank, self.world, self.options = seed, rank, world, options
        self.current: DALILoader | None = None  # the epoch in progress
        self.calibration: tuple[int, DALILoader] | None = None  # (n, its pipeline), built on first use
        val = DALILoader(val_list, prep, batch_size, train=False, shard_id=rank, num_shards=world, **options)
        # every shard runs the same number of steps: the smallest shard's count of full batches
        steps = (len(train_list.files) // world) // batch_size
        super().__init__(val, steps, len(train_list.files), train_list.classes)

    def train_epoch(self, epoch: int, start_batch: int = 0, state: bytes | None = None):
        """With ``state`` (a pipeline checkpoint) DALI restores the reader position and every random
        generator. Without one (e.g. a checkpoint of another loader), the pipeline runs forward
        ``start_batch`` batches that are dropped: the same batches follow, at the cost of decoding them."""
        self.current = DALILoader(self.train_list, self.prep, self.batch_size, train=True, seed=self.seed,
                                  epoch=epoch, shard_id=self.rank, num_shards=self.world, checkpoint=state,
                                  **self.options)
        if state is not None or not start_batch:
            return self.current
        return itertools.islice(self.current, start_batch, None)

    def sample_images(self, n: int, mix=None) -> torch.Tensor:
        images = super().sample_images(n, mix)
        self.current = None  # that pipeline was not the training loop's: nothing of it goes into a checkpoint
        return images

    def train_state(self) -> bytes | None:
        return self.current.checkpoint() if self.current is not None else None

    def calibration_batches(self, n: int) -> DALILoader:
        """A pipeline of its own (no training pipeline's state is touched), the validation one's
        preparation over this process's calibration files in order: built on the first call, then reused."""
        if self.calibration is None or self.calibration[0] != n:
            files = self.train_list
            indices = calibration_indices(len(files.files), n, self.batch_size, self.seed, self.rank, self.world)
            if not indices:
                return []
            share = FileList([files.files[i] for i in indices], [files.labels[i] for i in indices], files.classes, [])
            self.calibration = n, DALILoader(share, self.prep, self.batch_size, train=False, **self.options)
        return self.calibration[1]


def _auto_augment(images, policy: tuple[str, int, int], size: int):
    """DALI's policy on the uint8 HWC crop, with torchvision's translation ranges (RandAugment and
    AutoAugment: up to 150/331 of the image; TrivialAugment wide: up to 32 px, DALI's default there),
    black outside and nearest-neighbour warps, as torchvision's defaults."""
    from nvidia.dali import types
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    name, n, m = policy
    common = dict(fill_value=0, interp_type=types.INTERP_NN)
    relative = dict(shape=(size, size), max_translate_rel=150 / 331, **common)
    if name == "randaugment":
        return rand_augment.rand_augment(images, n=n, m=m, **relative)
    if name == "trivialaugment":
        return trivial_augment.trivial_augment_wide(images, **common)
    return auto_augment.auto_augment_image_net(images, **relative)


def _erase(images, size: int):
    """One box of zeros in the normalised HWC image, drawn as torchvision's RandomErasing draws it (area
    share and log-aspect uniform, position uniform) except that a box too large for the image is
    clipped to it rather than drawn again."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    area = fn.random.uniform(range=list(ERASE_SCALE)) * float(size * size)
    ratio = dmath.exp(fn.random.uniform(range=list(LOG_RATIO)))
    h = dmath.min(dmath.sqrt(area * ratio), float(size))
    w = dmath.min(dmath.sqrt(area / ratio), float(size))
    y = fn.random.uniform(range=[0.0, 1.0]) * (float(size) - h)
    x = fn.random.uniform(range=[0.0, 1.0]) * (float(size) - w)
    return fn.erase(images, anchor=fn.stack(y, x), shape=fn.stack(h, w), axis_names="HW", fill_value=0.0)


def _shard_size(n: int, shard_id: int, num_shards: int) -> int:
    """DALI's split: shard i reads samples [n*i//S, n*(i+1)//S)."""
    return n * (shard_id + 1) // num_shards - n * shard_id // num_shards
