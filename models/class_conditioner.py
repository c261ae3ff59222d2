"""Class-conditional models' conditioner (LDM's ClassEmbedder): one learned vector per class, plus a null class
for classifier-free guidance. It takes prompts too (a class index or name), so class models serve through the
same prompt interface as text models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.names import normalise_name
from models.text.base import EncodedPrompts


class ClassConditioner(nn.Module):
    """Class label -> context [N, 1, dim] (LDM's ClassEmbedder); label `n_classes` is the null class.
    With `class_names`, a prompt may also name its class ("red circle"). With `null=False` (the CompVis zoo's
    cin256: 1000 rows, all classes) there is no null class: `null_class` is None and the model is sampled
    without classifier-free guidance."""

    def __init__(self, n_classes: int, dim: int, class_names: Sequence[str] = (), *, null: bool = True) -> None:
        super().__init__()
        if n_classes < 1 or dim < 1:
            raise ValueError(f"ClassConditioner needs n_classes >= 1 and dim >= 1, got {n_classes}, {dim}")
        if class_names and len(class_names) != n_classes:
            raise ValueError(f"ClassConditioner: {len(class_names)} class names for {n_classes} classes")
        self.n_classes = n_classes
        self.class_names = tuple(class_names)
        # the unconditional input for classifier-free guidance
        self.null_class: int | None = n_classes if null else None
        self.embedding = nn.Embedding(n_classes + (1 if null else 0), dim)
        self.context_dim = dim

    def encode(self, prompts: Sequence[str] | Sequence[int] | Tensor) -> EncodedPrompts:
        """Class ids [N] in 0..n_classes -> context [N, 1, dim]. Prompts may be text: a class index such as
        "207", or "" for the null class, so the class model serves through the same prompt interface."""
        if isinstance(prompts, Tensor):
            ids = prompts.to(dtype=torch.long).reshape(-1).tolist()
        else:
            ids = [self._label(p) for p in prompts]
        top = self.n_classes if self.null_class is not None else self.n_classes - 1
        bad = [i for i in ids if not 0 <= i <= top]
        if bad:
            null = f" ({top} = the null class)" if self.null_class is not None else " (this model has no null class)"
            raise ValueError(f"class ids must be in 0..{top}{null}, got {bad}")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.embedding.weight.device)
        return EncodedPrompts(self.embedding(ids_t)[:, None, :], [])

    def _label(self, prompt: str | int) -> int:
        if isinstance(prompt, int):
            return prompt
        text = prompt.strip()
        if not text:
            if self.null_class is None:
                raise ValueError("this class-conditional model has no null class: an empty prompt "
                                 "(unconditional) is not an input it takes")
            return self.null_class
        names = [normalise_name(n) for n in self.class_names]
        if normalise_name(text) in names:
            return names.index(normalise_name(text))
        try:
            return int(text)
        except ValueError:
            named = f", or a class name ({', '.join(self.class_names)})" if self.class_names else ""
            raise ValueError(
                f"a class-conditional model takes a class index 0..{self.n_classes - 1}{named} as its prompt "
                f"('' = unconditional), got {prompt!r}"
            ) from None
