"""`dmd_cema`: one upload, two uses. The clips the switcher offloads are answered by the
cloud and, those of them that pass CEMA's filters, join the cloud's adaptation buffer, so
the edge adapts from traffic it already sends and uploads nothing for adaptation alone.

Per batch: the CEMA edge (its latest normalisation parameters, the batch's statistics)
gives logits and features; the operating point's router reads them and routes; the routed
clips go up once (`upload_crf`: as H.264) and the cloud classifies them; CEMA's upload
filters, run on every clip (so `E_max` follows the stream) but choosing only among the
routed ones, decide which of them the cloud also adapts on; the cloud's step, when one
runs, sends the edge its new parameters (`download_delay` batches later). The routed
clips are answered, before the step, by the cloud model as trained or (`cloud_answers=
'adapted'`) by CEMA's foundation model as adapted so far: under a shift the cloud's own
model degrades too, and the joint mode adapts it from the same traffic. The router was
trained on the source edge's features; here it reads the adapting edge's, as a deployed
edge would (`dmd` with `batch_statistics` isolates what the normalisation alone does to it).

Settings: CEMA's (`config.adapt.cema`, shared with the `cema` method) and, in
`config.adapt.dmd_cema`, offloading's (`switcher_dir`, `operating_point`); CEMA's
`upload_crf` serves both uses.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dmd_jax.tta import cema, offload
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import BatchResult, Context


# Who answers the offloaded clips: the cloud model as trained, or CEMA's foundation model
# as adapted so far (its BatchNorm, if any, normalising them with recent uploads).
CLOUD_ANSWERS = ("model", "adapted")


class Method(cema.Method):

    EXTENDS = "cema"  # config.adapt.cema, plus config.adapt.dmd_cema's own settings
    SETTINGS = cema.Method.SETTINGS + tuple(s for s in offload.SETTINGS
                                            if s not in cema.Method.SETTINGS) + ("cloud_answers",)

    def __init__(self, edge: Adaptable, cfg: ml_collections.ConfigDict, context: Context):
        self.name = context.name
        foundation = context.foundation()
        # Encoding happens once, for both uses, in the offloader.
        self.edge = cema.Edge(edge, context.mesh, ml_collections.ConfigDict(
            {**cfg.to_dict(), "upload_crf": 0}), context.seed)
        self.cloud = cema.Cloud(edge, foundation, context.mesh, cfg, context.seed)
        self.downlink = cema.Downlink(int(cfg.download_delay))
        self.offloader = offload.Offloader(edge, foundation.model, cfg, context.mesh)
        if cfg.cloud_answers not in CLOUD_ANSWERS:
            raise cema.CloudConfigError(
                f"config.adapt.dmd_cema.cloud_answers={cfg.cloud_answers!r}: expected one of "
                f"{CLOUD_ANSWERS}")
        self._answer = (None if cfg.cloud_answers == "model" else
                        lambda clips: self.cloud.classify(clips, cfg.new_per_step))

    def process(self, clips: jax.Array) -> BatchResult:
        logits, features = self.edge.predict_outputs(clips)
        e_max = self.edge.filter.e_max()
        offloaded = self.offloader.route(features, logits)
        adapt_on, failed = self.edge.choose(logits, candidates=offloaded)
        sent = self.offloader.send(clips, offloaded, self._answer)  # answered, then adapted on
        upload = self.edge.package(sent.clips[adapt_on[offloaded]])
        replay_only_before = self.cloud.replay_only_steps
        download, step_losses = self.cloud.receive(upload)
        arrived, loss = self.downlink.after_batch(
            download, float(np.mean(step_losses)) if step_losses else float("nan"))
        for parameters in arrived:
            self.edge.receive(parameters)
        # The clips went up once; the statistics of batch renormalisation, once, with them.
        stats_bytes = upload.nbytes - int(upload.clips.nbytes)
        return BatchResult(
            self.offloader.answers(logits, sent), learned_from=adapt_on, uploaded=offloaded,
            loss=loss, updated=bool(arrived), bytes_up=sent.bytes_up + stats_bytes,
            bytes_down=download.nbytes if download is not None else 0,
            cloud_steps=len(step_losses), filter_failed=failed,
            metrics={"e_max": e_max, "buffer": len(self.cloud.buffer),
                     "replay_only_steps": self.cloud.replay_only_steps - replay_only_before})
