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
    With `class_names`, a prompt may also name its class ("red circle")."""

    def __init__(self, n_classes: int, dim: int, class_names: Sequence[str] = ()) -> None:
        super().__init__()
        if n_classes < 1 or dim < 1:
            raise ValueError(f"ClassConditioner needs n_classes >= 1 and dim >= 1, got {n_classes}, {dim}")
        if class_names and len(class_names) != n_classes:
            raise ValueError(f"ClassConditioner: {len(class_names)} class names for {n_classes} classes")
        self.n_classes = n_classes
        self.class_names = tuple(class_names)
        self.null_class = n_classes  # the unconditional input for classifier-free guidance
        self.embedding = nn.Embedding(n_classes + 1, dim)
        self.context_dim = dim

    def encode(self, prompts: Sequence[str] | Sequence[int] | Tensor) -> EncodedPrompts:
        """Class ids [N] in 0..n_classes -> context [N, 1, dim]. Prompts may be text: a class index such as
        "207", or "" for the null class, so the class model serves through the same prompt interface."""
        if isinstance(prompts, Tensor):
            ids = prompts.to(dtype=torch.long).reshape(-1).tolist()
        else:
            ids = [self._label(p) for p in prompts]
        bad = [i for i in ids if not 0 <= i <= self.n_classes]
        if bad:
            n = self.n_classes
            raise ValueError(f"class ids must be in 0..{n} ({n} = the null class), got {bad}")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.embedding.weight.device)
        return EncodedPrompts(self.embedding(ids_t)[:, None, :], [])

    def _label(self, prompt: str | int) -> int:
        if isinstance(prompt, int):
            return prompt
        text = prompt.strip()
        if not text:
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
