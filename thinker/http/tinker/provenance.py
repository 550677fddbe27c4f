"""The loss inputs the server supplies itself: what ``gspo`` and ``stable_reinforce`` read
besides the client's tensors (backend/train/losses.py).

- ``stable_reinforce``: each datum's ``loss_fn_input_spans`` (``Datum.with_provenance``) name,
  run by run, the sampled sequence behind its targets. The loss reads the logprob the sampler
  recorded for each sampled target (``record_stability_info``; thinker/store/recorded_sequences.py),
  never one the client sends, and only at those positions (``stability_mask``). A target that is
  not the token the named sequence sampled there, a sequence of another session or one that
  has expired, or a nonzero advantage on a prompt token is a 400 naming the datum.
- ``gspo``: ``sequence_ratio_mask``, when the datum has none, is where its advantages are
  nonzero (the sampled tokens, in an RL datum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tinker.proto import tinker_public_pb2 as pb

from backend.train.examples import Example
from thinker.core.errors import BadRequestError, clip
from thinker.store.recorded_sequences import RecordedSequence, RecordedSequences

HOW = "sample with record_stability_info=True and annotate each datum with Datum.with_provenance(...)"


def server_inputs(
    loss_fn: str,
    data: Sequence[pb.Datum],
    examples: list[Example],
    session_id: str,
    recorded: RecordedSequences,
) -> list[Example]:
    if loss_fn == "gspo":
        return [_with_ratio_mask(ex) for ex in examples]
    if loss_fn == "stable_reinforce":
        return _stable_reinforce_inputs(data, examples, session_id, recorded)
    return examples


def _with_ratio_mask(example: Example) -> Example:
    if "sequence_ratio_mask" in example.loss_inputs or "advantages" not in example.loss_inputs:
        return example  # (without advantages the loss's own check names what is missing)
    mask_T = (example.loss_inputs["advantages"] != 0).float()
    return Example(example.input_tokens, {**example.loss_inputs, "sequence_ratio_mask": mask_T})


def _spans(datum: pb.Datum, i: int, length: int) -> list[tuple[str, pb.SampledProvenanceSpan]]:
    """(kind, span) runs tiling the datum's ``length`` loss positions."""
    if not datum.loss_fn_input_spans:
        raise BadRequestError(f"data[{i}]: stable_reinforce needs provenance on every datum; {HOW}")
    runs = []
    for span in datum.loss_fn_input_spans:
        kind = span.WhichOneof("span")
        if kind is None:
            raise BadRequestError(f"data[{i}].loss_fn_input_spans: a span names neither prompt nor sampled tokens")
        runs.append((kind, getattr(span, kind)))
    covered = sum(run.length for _, run in runs)
    if covered != length:
        raise BadRequestError(
            f"data[{i}].loss_fn_input_spans: the spans cover {covered} positions but the datum has {length}"
        )
    return runs


def _stable_reinforce_inputs(
    data: Sequence[pb.Datum], examples: list[Example], session_id: str, recorded: RecordedSequences
) -> list[Example]:
    runs = [_spans(datum, i, ex.length) for i, (datum, ex) in enumerate(zip(data, examples, strict=True))]
    named = {run.sequence_id for datum_runs in runs for _, run in datum_runs}
    found = {k: v for k, v in recorded.get(sorted(named)).items() if v.session_id == session_id}
    return [_resolve(i, ex, datum_runs, found) for i, (ex, datum_runs) in enumerate(zip(examples, runs, strict=True))]


def _resolve(i: int, example: Example, runs: list, found: dict[str, RecordedSequence]) -> Example:
    inputs = example.loss_inputs
    if "advantages" not in inputs:
        raise BadRequestError(f"data[{i}].loss_fn_inputs: stable_reinforce takes target_tokens and advantages")
    targets_T, advantages_T = inputs["target_tokens"], inputs["advantages"]
    if targets_T.dim() != 1:
        raise BadRequestError(f"data[{i}].loss_fn_inputs.target_tokens: (T, K) targets are for cross_entropy only")
    sampler_logprobs_T = torch.zeros(example.length, dtype=torch.float32)
    stability_mask_T = torch.zeros(example.length, dtype=torch.float32)
    position = 0
    for kind, run in runs:
        end = position + run.length
        sequence = found.get(run.sequence_id)
        if sequence is None:
            raise BadRequestError(
                f"data[{i}].loss_fn_input_spans: sequence_id {clip(repr(run.sequence_id))} is not a recorded "
                "sequence of this session (sampled without record_stability_info, by another session, or more "
                "than a day since its last use)"
            )
        if kind == "prompt_tokens":
            if bool((advantages_T[position:end] != 0).any()):
                raise BadRequestError(
                    f"data[{i}].loss_fn_inputs.advantages: nonzero at a prompt position in [{position}, {end}); "
                    "stable_reinforce takes advantages on sampled tokens only"
                )
        else:
            if run.offset + run.length > len(sequence.tokens):
                raise BadRequestError(
                    f"data[{i}].loss_fn_input_spans: [{run.offset}, {run.offset + run.length}) runs past the "
                    f"{len(sequence.tokens)} tokens sequence {run.sequence_id!r} sampled"
                )
            sampled = torch.tensor(sequence.tokens[run.offset : run.offset + run.length], dtype=torch.long)
            if not torch.equal(targets_T[position:end], sampled):
                raise BadRequestError(
                    f"data[{i}].loss_fn_inputs.target_tokens: positions [{position}, {end}) are not the tokens "
                    f"sequence {run.sequence_id!r} sampled at [{run.offset}, {run.offset + run.length})"
                )
            recorded_q = sequence.logprobs[run.offset : run.offset + run.length]
            sampler_logprobs_T[position:end] = torch.tensor(recorded_q, dtype=torch.float32)
            stability_mask_T[position:end] = 1.0
        position = end
    own = {k: v for k, v in inputs.items() if k != "logprobs"}  # the recorded logprobs replace the client's
    return Example(example.input_tokens, {**own, "logprobs": sampler_logprobs_T, "stability_mask": stability_mask_T})
