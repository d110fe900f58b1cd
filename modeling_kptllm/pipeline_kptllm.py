"""The "keypoint-comprehension" pipeline: KptLLM as `transformers.pipeline(...)` loads it from a model folder.

    from transformers import pipeline
    detector = pipeline("keypoint-comprehension", model="user/kptllm", trust_remote_code=True)
    detector(query="query.jpg", support="support.jpg", kpts=[[120, 80], [160, 95]])
    # -> [{"bbox": [0.0, 0.0, 640.0, 480.0], "keypoints": [{"label": 0, "name": "left eye", "x": ..., "y": ...,
    #      "score": ...}, ...]}]                                   (one dict per box of the query image)

The model folder's config.json names this file under `custom_pipelines` (`save_pretrained` writes both),
so the pipeline needs no registration. One call is one processor call and one `detect_keypoints` call,
whatever the number of query images and boxes.
This file ships to the Hub as remote code: relative imports only.
"""

import math
from typing import Any

from transformers import Pipeline
from transformers.image_utils import load_image

PROCESSOR_ARGUMENTS = (
    "task", "kpt_names", "text", "query_bbox", "support_bbox", "support_visible", "identify_then_detect",
)


class KptLlmKeypointPipeline(Pipeline):
    """Query image(s) + a visual prompt (support image and keypoints) or a textual one (keypoint names)
    -> per box, each keypoint's name, position in query-image pixels and score.

    Images are PIL images, uint8 arrays, paths or URLs. Every argument of `KptLlmProcessor.__call__`
    (task, kpt_names, text, query_bbox, support_bbox, support_visible, identify_then_detect) and
    `max_new_tokens` of `detect_keypoints` may be given to the call or to `pipeline(...)`.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __call__(self, query=None, support=None, kpts=None, **kwargs) -> list:
        """A query image -> one dict per box: {"bbox": [x, y, w, h], "keypoints": [{"label", "name", "x",
        "y", "score"}, ...]} (x, y None and score 0 where the model placed no keypoint). A list of query
        images -> one such list per image."""
        if query is None:
            raise ValueError("pass query= (an image, a path or URL, or a list of them)")
        return super().__call__({"query": query, "support": support, "kpts": kpts}, **kwargs)

    def _sanitize_parameters(self, max_new_tokens: int | None = None, **kwargs) -> tuple[dict, dict, dict]:
        unknown = sorted(set(kwargs) - set(PROCESSOR_ARGUMENTS))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; the pipeline takes {list(PROCESSOR_ARGUMENTS)} and max_new_tokens")
        forward_params = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        return kwargs, forward_params, {}

    def preprocess(self, inputs: dict, **processor_kwargs) -> dict:
        query, support = inputs["query"], inputs["support"]
        query_is_list = isinstance(query, (list, tuple))
        queries = [_opened(image) for image in query] if query_is_list else _opened(query)
        if isinstance(support, (list, tuple)):
            support = [_opened(image) for image in support]
        elif support is not None:
            support = _opened(support)
        model_inputs = self.processor(query=queries, support=support, kpts=inputs["kpts"], **processor_kwargs)
        return {"model_inputs": model_inputs, "query_is_list": query_is_list}

    def _forward(self, inputs: dict, **forward_params) -> dict:
        outputs = self.model.detect_keypoints(**inputs["model_inputs"], **forward_params)
        return {"outputs": outputs, "query_is_list": inputs["query_is_list"]}

    def postprocess(self, model_outputs: dict) -> list:
        per_image = self.processor.post_process_keypoint_detection(model_outputs["outputs"])
        formatted = [[as_json_friendly(result) for result in image_results] for image_results in per_image]
        return formatted if model_outputs["query_is_list"] else formatted[0]


def _opened(image):
    """A path or URL is opened (transformers' `load_image`); images and arrays are passed on as they are."""
    return load_image(image) if isinstance(image, str) else image


def as_json_friendly(result: dict[str, Any]) -> dict[str, Any]:
    """One box's `post_process_keypoint_detection` dict as plain Python (what the CLI writes as JSON)."""
    keypoints = []
    for label, name, (x, y), score in zip(
        result["labels"].tolist(), result["names"], result["keypoints"].tolist(), result["scores"].tolist()
    ):
        placed = not (math.isnan(x) or math.isnan(y))
        keypoints.append({"label": label, "name": name, "x": x if placed else None, "y": y if placed else None, "score": score})
    return {"bbox": result["bbox"].tolist(), "keypoints": keypoints}


__all__ = ["KptLlmKeypointPipeline", "as_json_friendly"]
