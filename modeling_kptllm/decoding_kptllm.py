"""Identify-then-detect decoding for KptLLM: greedy answers, `<keypoint>` coordinates and their scores.

`KptLlmDecodingMixin.detect_keypoints` answers a batch of keypoint rows (the K keypoints of one or
several query instances, as the processor lays them out) with a KV cache. Rows that come from the
same query crop share their start (system text + query image tokens): that prefix is prefilled
once per crop, and every row of the crop attends to its cache.
This file ships to the Hub as remote code beside modeling_kptllm.py: relative imports only.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput


@dataclass
class KptLlmDetectionOutput(ModelOutput):
    """
    sequences: (B, T) generated token ids (the answer: name, then `<keypoint>`), padded with the
        pad token after a row finished.
    pred_keypoints: (B, 2) normalized (x, y) in the query crop; NaN where no `<keypoint>` was emitted.
    keypoint_found: (B,) whether the row emitted `<keypoint>`.
    keypoint_scores: (B,) confidence of each row's keypoint: the probability of the emitted `<keypoint>`
        token times the geometric mean of the probabilities of the answer tokens written before it (the
        sentence that names the keypoint, "It is the left eye."), all under the greedy decoding
        distribution; for a prompt that already ends with `<keypoint>` (the no-ItD ablation), the
        probability the model gives `<keypoint>` there. 0 where no `<keypoint>` was emitted.
    keypoint_layout: the processor's record of the query images and boxes the rows came from, passed
        through unchanged so that `processor.post_process_keypoint_detection(outputs)` needs nothing else.
    """

    sequences: torch.LongTensor | None = None
    pred_keypoints: torch.FloatTensor | None = None
    keypoint_found: torch.BoolTensor | None = None
    keypoint_scores: torch.FloatTensor | None = None
    keypoint_layout: Any = None


class Prefill(NamedTuple):
    logits: torch.Tensor  # (B, 2, V): the scores at the rows' last two prompt positions
    pred_keypoints: torch.Tensor  # (B, 2): keypoints of prompts ending with `<keypoint>`, else NaN
    cache: Cache


class KptLlmDecodingMixin:
    """`detect_keypoints` and its shared-prefix prefill, for `KptLlmForKeypointComprehension`."""

    @torch.no_grad()
    def detect_keypoints(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        support_pixel_values: torch.Tensor | None = None,
        prompt_coords: torch.Tensor | None = None,
        prompt_visible: torch.Tensor | None = None,
        query_index: torch.LongTensor | None = None,
        keypoint_layout: Any = None,
        max_new_tokens: int = 24,
        share_prefix: bool = True,
    ) -> KptLlmDetectionOutput:
        """Identify-then-detect for a batch of keypoint rows (the K keypoints of one or more query instances).

        Greedy decoding with the KV cache: each row writes the keypoint's name, then `<keypoint>`; the
        row's coordinates come from the keypoint head at the step that feeds `<keypoint>` back in, and
        its score is p(`<keypoint>`) times the geometric mean of the probabilities of the tokens written
        before it (see `KptLlmDetectionOutput.keypoint_scores`). For the semantic task no `<keypoint>` is
        emitted: the coordinates stay NaN and the scores 0. Prompts that already end with `<keypoint>`
        (the no-ItD ablation) are answered by the prefill alone.

        `query_index` (B,) names each row's crop in `pixel_values` (the processor writes it; without it a
        single crop serves every row, or there is one crop per row). With `share_prefix` (the default),
        the rows of one crop that start with the same tokens up to and including the query image (the
        processor's layout) prefill that prefix once per crop, and attend to its KV cache; only the
        per-row rest (keypoint prompt, question) is prefilled per row. Rows without such a prefix, or
        `share_prefix=False`, prefill every row in full. Both give the same answers.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer (the answer's length budget), got {max_new_tokens!r}")
        self._check_sequence_inputs(input_ids, pixel_values, support_pixel_values, prompt_coords, attention_mask, max_new_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kpt_id = self.config.keypoint_token_id
        eos_ids = torch.tensor(self._eos_token_ids(), device=input_ids.device)
        pad_id = self.generation_config.pad_token_id
        pad_id = pad_id if pad_id is not None else int(eos_ids[0])
        batch = input_ids.shape[0]

        prefix_length = 0
        if share_prefix:
            prefix_length = self._shared_prefix_length(
                input_ids, attention_mask, pixel_values, support_pixel_values, prompt_coords, query_index
            )
        if prefix_length:
            out, attention_mask, position_ids = self._prefill_with_shared_prefix(
                prefix_length, input_ids, attention_mask, pixel_values, support_pixel_values, prompt_coords, prompt_visible,
                pad_id, query_index=query_index,
            )
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding aware
            out = self(
                input_ids=input_ids,
                pixel_values=pixel_values,
                support_pixel_values=support_pixel_values,
                prompt_coords=prompt_coords,
                prompt_visible=prompt_visible,
                query_index=query_index,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=2,
            )
        pred_keypoints = out.pred_keypoints  # NaN unless the prompt itself ends with <keypoint>
        found = (input_ids[:, -1] == kpt_id) & ~pred_keypoints.isnan().any(-1)
        # a prompt ending with <keypoint>: its score is what the model gives <keypoint> right before it
        keypoint_probability = torch.where(found, self._token_log_probs(out.logits[:, -2], kpt_id).exp(), 0.0)
        name_log_probability = torch.zeros(batch, device=input_ids.device)  # summed over the tokens before <keypoint>
        name_tokens = torch.zeros(batch, device=input_ids.device)
        finished = found.clone()
        generated = []
        next_tokens = self._greedy_token(out.logits[:, -1])  # (B,)
        next_log_probs = self._token_log_probs(out.logits[:, -1], next_tokens)
        last_position = position_ids[:, -1:]
        for _ in range(max_new_tokens):
            if finished.all():
                break
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
            generated.append(next_tokens)
            writing = ~finished
            is_keypoint = next_tokens == kpt_id
            keypoint_probability = torch.where(writing & is_keypoint, next_log_probs.exp(), keypoint_probability)
            name_log_probability += torch.where(writing & ~is_keypoint, next_log_probs, 0.0)
            name_tokens += (writing & ~is_keypoint).float()
            finished |= torch.isin(next_tokens, eos_ids)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            last_position = last_position + 1
            out = self(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=last_position,
                cache=out.cache,
                use_cache=True,
            )
            fed_keypoint = is_keypoint & ~finished
            pred_keypoints = torch.where(fed_keypoint[:, None], out.pred_keypoints, pred_keypoints)
            found |= fed_keypoint
            finished |= fed_keypoint
            next_tokens = self._greedy_token(out.logits[:, -1])
            next_log_probs = self._token_log_probs(out.logits[:, -1], next_tokens)
        sequences = torch.stack(generated, dim=1) if generated else input_ids.new_zeros(batch, 0)
        # geometric mean of the naming tokens (1 when there are none: the no-ItD prompts)
        name_probability = (name_log_probability / name_tokens.clamp(min=1)).exp()
        scores = torch.where(found, keypoint_probability * name_probability, 0.0)
        return KptLlmDetectionOutput(
            sequences=sequences, pred_keypoints=pred_keypoints, keypoint_found=found, keypoint_scores=scores,
            keypoint_layout=keypoint_layout,
        )

    def _crop_of_row(
        self, pixel_values: torch.Tensor, query_index: torch.LongTensor | None, batch: int
    ) -> torch.LongTensor | None:
        """Each row's query crop (B,) in `pixel_values`, when rows share crops; None when every row has its own."""
        if query_index is not None:
            return query_index
        if pixel_values.shape[0] == 1:
            return torch.zeros(batch, dtype=torch.long, device=pixel_values.device)
        return None  # one crop per row: the rows may differ, nothing is shared

    def _shared_prefix_length(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        support_pixel_values: torch.Tensor | None,
        prompt_coords: torch.Tensor | None,
        query_index: torch.LongTensor | None = None,
    ) -> int:
        """Tokens at the start of every (unpadded) row that `detect_keypoints` can prefill once per query crop.

        The prefix is the rows' longest common start, cut before the first `<kpt_prompt>` or
        `<keypoint>` (their features differ per row) and before each row's last two tokens (whose logits
        start and score the answer). It must hold every `<image>` token of every row, filled from the
        row's query crop, and some crop must serve two rows or more. 0 means "prefill each row in full"
        (the path that also reports bad inputs).
        """
        batch, length = input_ids.shape
        if batch < 2 or pixel_values is None or pixel_values.ndim != 4:
            return 0
        crop_of_row = self._crop_of_row(pixel_values, query_index, batch)
        if crop_of_row is None or crop_of_row.shape != (batch,) or crop_of_row.unique().numel() == batch:
            return 0  # no crop serves two rows: nothing is shared
        if (support_pixel_values is None) != (prompt_coords is None) or attention_mask.shape != input_ids.shape:
            return 0
        mask = attention_mask.bool()
        lengths = mask.sum(-1)  # (B,)
        starts = length - lengths  # (B,) first real token of each row
        columns = torch.arange(length, device=input_ids.device)
        if not torch.equal(mask, columns[None] >= starts[:, None]):
            return 0  # not plain left padding: positions would not follow the layout below
        shortest = int(lengths.min())
        if shortest < 3:
            return 0
        aligned = input_ids.gather(1, starts[:, None] + columns[None, :shortest])  # (B, shortest) padding dropped
        per_row_token = torch.isin(
            aligned[0], torch.tensor([self.config.kpt_prompt_token_id, self.config.keypoint_token_id], device=input_ids.device)
        )
        stops = (aligned != aligned[:1]).any(0) | per_row_token  # (shortest,)
        prefix_length = int(stops.int().argmax()) if stops.any() else shortest
        prefix_length = min(prefix_length, shortest - 2)
        image_id = self.config.image_token_id
        images_in_prefix = int((aligned[0, :prefix_length] == image_id).sum())
        if images_in_prefix == 0 or ((input_ids == image_id) & mask).sum(-1).ne(images_in_prefix).any():
            return 0  # the query image is not (entirely) in the shared part
        return prefix_length

    def _prefill_with_shared_prefix(
        self,
        prefix_length: int,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        support_pixel_values: torch.Tensor | None,
        prompt_coords: torch.Tensor | None,
        prompt_visible: torch.Tensor | None,
        pad_id: int,
        query_index: torch.LongTensor | None = None,
    ) -> tuple[Prefill, torch.Tensor, torch.Tensor]:
        """Prefill the shared prefix once per query crop, give every row its crop's cache, then prefill the rests.

        Each row's cache is laid out [prefix | left padding | own tokens]; positions are those of the
        full per-row computation (0 .. length-1), so the answers match the unshared path. Returns the
        last step's output (the last two positions' logits, keypoints of prompts ending with
        `<keypoint>`, the rows' cache), the attention mask over the cache (B, P + S) and the rows'
        positions (B, S).
        """
        batch, length = input_ids.shape
        device = input_ids.device
        lengths = attention_mask.bool().sum(-1)  # (B,)
        embed_tokens, decoder = self.get_input_embeddings(), self.get_decoder()
        crops, crop_of_row = torch.unique(self._crop_of_row(pixel_values, query_index, batch), return_inverse=True)  # (U,), (B,)
        num_crops = len(crops)

        # one vision-tower call for the query crops and the support crops (`_encode_images` encodes a
        # support crop that is the query crop itself, as in the semantic task, only once)
        self._check_pixel_values(pixel_values, "pixel_values")
        if int(crops.max()) >= pixel_values.shape[0] or int(crops.min()) < 0:
            raise ValueError(f"query_index names crops outside the {pixel_values.shape[0]} of pixel_values")
        images = [pixel_values[crops]]
        if support_pixel_values is not None:
            self._check_pixel_values(support_pixel_values, "support_pixel_values")
            images.append(support_pixel_values.to(pixel_values.device))
        vision_features = self._encode_images(torch.cat(images))  # (U [+ S], h*w, D_v)

        # the shared prefix, once per crop (every row holds the same prefix ids)
        start = length - int(lengths[0])
        prefix_ids = input_ids[:1, start : start + prefix_length].expand(num_crops, -1)  # (U, P)
        image_features = self.multi_modal_projector(vision_features[:num_crops]).flatten(0, 1)  # (U*h*w, D_llm)
        prefix_embeds = self._scatter_placeholders(
            embed_tokens(prefix_ids), prefix_ids, self.config.image_token_id, image_features, "Image"
        )  # (U, P, D_llm)
        prefix_positions = torch.arange(prefix_length, device=device)[None].expand(num_crops, -1)  # (U, P)
        cache = decoder(
            inputs_embeds=prefix_embeds, attention_mask=torch.ones_like(prefix_ids), position_ids=prefix_positions, use_cache=True
        ).cache
        cache.batch_select_indices(crop_of_row)  # every layer's keys/values: (U, H, P, d) -> (B, H, P, d)

        # the rows' own tokens as one left-padded batch
        suffix_lengths = lengths - prefix_length  # (B,) >= 2
        suffix_width = int(suffix_lengths.max())
        suffix_mask = torch.arange(suffix_width, device=device)[None] >= (suffix_width - suffix_lengths)[:, None]  # (B, S)
        # the padding slots may hold other rows' prefix tokens (e.g. <image>): blank them out
        suffix_ids = input_ids[:, length - suffix_width :].masked_fill(~suffix_mask, pad_id)  # (B, S)
        suffix_embeds = embed_tokens(suffix_ids)  # (B, S, D_llm)
        if support_pixel_values is not None:
            support_features = vision_features[num_crops:]  # (S_shots, h*w, D_v)
            prompt_features = self.get_prompt_features(support_features, prompt_coords, prompt_visible)
            suffix_embeds = self._scatter_placeholders(
                suffix_embeds, suffix_ids, self.config.kpt_prompt_token_id, prompt_features, "Keypoint prompt"
            )
        elif (suffix_ids == self.config.kpt_prompt_token_id).any():
            raise ValueError("input_ids contain <kpt_prompt> tokens but no support_pixel_values/prompt_coords")
        positions = (prefix_length + suffix_mask.long().cumsum(-1) - 1).clamp(min=prefix_length)  # (B, S)
        attention = torch.cat([attention_mask.new_ones(batch, prefix_length), suffix_mask.to(attention_mask.dtype)], dim=-1)
        outputs = decoder(inputs_embeds=suffix_embeds, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True)
        hidden_states = outputs.last_hidden_state  # (B, S, D_llm)
        prefill = Prefill(
            logits=self.get_output_embeddings()(hidden_states[:, -2:]),  # (B, 2, V)
            pred_keypoints=self.predict_keypoints(suffix_ids, hidden_states),  # (B, 2)
            cache=outputs.cache,
        )
        return prefill, attention, positions

    def _decoding_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits with the placeholders ruled out: `<image>`/`<kpt_prompt>` carry features only at
        prefill, so a (barely trained) model that wrote one could not be fed it back. `generate()` gets
        the same rule from `generation_config.suppress_tokens`."""
        logits = logits.clone()
        logits[:, [self.config.image_token_id, self.config.kpt_prompt_token_id]] = float("-inf")
        return logits

    def _greedy_token(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) -> (B,) argmax, never a placeholder."""
        return self._decoding_logits(logits).argmax(-1)

    def _token_log_probs(self, logits: torch.Tensor, tokens: torch.Tensor | int) -> torch.Tensor:
        """log p(token) under the decoding distribution (placeholders ruled out): (B, V), (B,) or an id -> (B,)."""
        log_probs = self._decoding_logits(logits).float().log_softmax(-1)
        if isinstance(tokens, int):
            return log_probs[:, tokens]
        return log_probs.gather(1, tokens[:, None]).squeeze(1)

    def _eos_token_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.config.text_config.eos_token_id
        if eos is None:
            raise ValueError("set generation_config.eos_token_id so that decoding knows when a row has finished")
        return [eos] if isinstance(eos, int) else list(eos)


__all__ = ["KptLlmDecodingMixin", "KptLlmDetectionOutput"]
