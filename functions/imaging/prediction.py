"""How long an image job takes, predicted before it starts (issue 13): the whole job a user waits for, not only the
compressor.

    job = fixed costs + the estimate + max(compress, write) + upload

- fixed costs: starting the command and the embedded engine and running the workflow's states around the data
  (`CLI_FIXED_S`, measured on the bench's 2-core machine with an empty disk), or only the states when the engine is
  already running (`WARM_FIXED_S`: `imaging serve`, the API's estimate);
- the estimate, which the job runs again in its Estimate step (its own measured time), unless the command made it
  while the engine loaded (`imaging image create` does: see functions.imaging.head_start);
- compress: the estimate's prediction of the compressor on this machine (vhdcore times a few spans of the data),
  times the ratio of measured to predicted compress time that this machine's earlier jobs showed (a file store
  remembers it: `COMPRESS_TIME_RATIO`; 1 until a job of at least `LEARN_FROM_S` was measured);
- write: the compressed bytes at the store's measured write rate (an image written in place goes to the device as
  it is compressed, so the slower of the two sets the pace; staged frames are written, then copied into parts);
- upload: the compressed bytes at the flavor's bandwidth, when frames are uploaded (staged layout);
- less what a command's head start compresses while the engine starts (`HEAD_START_SHARE` of the fixed cost).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

from functions.storage import FileObjectStore, ObjectStore, open_object_store
from functions.storage.bandwidth import DEFAULT_FLAVOR_CLASS, FLAVOR_CLASS_BANDWIDTH

COMPRESS_TIME_RATIO = "compress_time_ratio"
LEARN_FROM_S = 0.5
"""Jobs whose compress was predicted shorter than this teach nothing: their time is mostly fixed costs."""
RATIO_BOUNDS = (0.5, 3.0)

CLI_FIXED_S = 2.0
"""`imaging image create --disk D --wait` around its data, measured by bench_e2e on its 2-core machine: from the fork
to the first state (interpreter, imports, engine start, with the estimate made meanwhile: 1.64-1.89 s), the states'
own work (0.05 s) and from the last state to the exit (0.10-0.23 s)."""
WARM_FIXED_S = 0.3
"""The same job's states and records when the engine is already running."""
HEAD_START_SHARE = 0.25
"""How much of the fixed cost a head start turns into compression (functions.imaging.head_start): while the command
imports and starts the engine, the compressor shares the 2 cores with it. bench_e2e at 6de9f25 (mixed 1 GiB): the
job took 3.99 s where the fixed cost and `Chain.compress` add up to 4.44 s, 0.45 s (about a quarter of the fixed
cost) saved."""


class EstimateLike(Protocol):
    """What the prediction needs of a `vhdcore.Estimate`."""

    @property
    def compressed_bytes(self) -> int: ...
    @property
    def predicted_seconds(self) -> float: ...
    @property
    def seconds_spent(self) -> float: ...


@dataclass(frozen=True)
class JobTime:
    """The predicted seconds of a job and where they go."""

    seconds: float
    fixed_s: float
    estimate_s: float
    compress_s: float
    write_s: float
    upload_s: float

    @property
    def after_estimate(self) -> float:
        """What is left once the job's Estimate step is done: its first ETA."""
        return max(self.compress_s, self.write_s) + self.upload_s

    def to_json(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in asdict(self).items()}


def predict_job(
    estimate: EstimateLike,
    *,
    in_place: bool,
    write_rate: float | None,
    upload_rate: float | None,
    fixed_s: float = CLI_FIXED_S,
    compress_ratio: float = 1.0,
    estimate_in_job: bool = True,
    head_start: bool = False,
) -> JobTime:
    """The job's time from its estimate: `write_rate` is the store's sustained write rate in bytes per second (None:
    not a limit), `upload_rate` the flavor's bandwidth for uploads (None: unlimited), `compress_ratio` the measured
    over predicted compress time of earlier jobs; `head_start`: the command compresses while the engine starts."""
    compressed = estimate.compressed_bytes
    write_s = compressed / write_rate if write_rate else 0.0
    if not in_place:
        write_s *= 2  # staged frames are written, then their bytes copied again into the object's parts
    upload_s = compressed / upload_rate if upload_rate and not in_place else 0.0
    compress_s = estimate.predicted_seconds * compress_ratio
    estimate_s = estimate.seconds_spent if estimate_in_job else 0.0
    data_s = max(compress_s, write_s)
    ahead_s = min(data_s, fixed_s * HEAD_START_SHARE) if head_start and in_place else 0.0
    total = fixed_s + estimate_s + data_s - ahead_s + upload_s
    return JobTime(total, fixed_s, estimate_s, compress_s, write_s, upload_s)


def compress_ratio(store: ObjectStore) -> float:
    """What this machine's jobs taught about the estimate's compress time (1 where nothing was learned)."""
    learned = store.measurement(COMPRESS_TIME_RATIO) if isinstance(store, FileObjectStore) else None
    return learned if learned is not None else 1.0


def learn_compress_time(store: ObjectStore, predicted_s: float, measured_s: float) -> None:
    """Fold one job's measured compress time against the estimate's prediction into the remembered ratio (an
    average that halves the weight of older jobs), on a file store: its compressor ran on this machine."""
    if not isinstance(store, FileObjectStore) or predicted_s < LEARN_FROM_S or measured_s <= 0:
        return
    low, high = RATIO_BOUNDS
    ratio = min(high, max(low, measured_s / predicted_s))
    known = store.measurement(COMPRESS_TIME_RATIO)
    store.remember(COMPRESS_TIME_RATIO, ratio if known is None else (known + ratio) / 2)


def predict_cli_job(estimate: EstimateLike, store_url: str) -> JobTime:
    """`imaging image create --disk` of the estimated chain into the store at `store_url`, as the CLI runs it:
    written in place in a file store (at its measured write rate), uploaded at the default flavor's bandwidth to
    any other."""
    if store_url.startswith("file:"):
        store = open_object_store(store_url)
        rate = store.write_rate() if isinstance(store, FileObjectStore) else None
        return predict_job(
            estimate,
            in_place=True,
            write_rate=rate,
            upload_rate=None,
            compress_ratio=compress_ratio(store),
            estimate_in_job=False,
            head_start=True,
        )
    return predict_job(
        estimate,
        in_place=False,
        write_rate=None,
        upload_rate=FLAVOR_CLASS_BANDWIDTH[DEFAULT_FLAVOR_CLASS],
        estimate_in_job=False,
    )
