"""The training objectives. Each turns token ids into model inputs and labels; the model
only sees which attention mask to use (``prefix_lengths`` or none)."""

OBJECTIVES = ("masked_lm", "gap_summary", "summarize")
