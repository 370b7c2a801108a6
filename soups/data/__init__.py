"""Stage 1, data: the rows a study trains and scores on, and how they are rendered.

- `generated/`: the embedded default's generated skills and target (math, code, math_code)
  and the pretraining corpus of the embedded model;
- `datasets`: those tasks as disjoint train / validation / test `datasets`, and a loader of
  datasets in the same columns;
- `sources`: any other dataset (files, the hub) through templates, filters, carving and
  decontamination;
- `prompts`: prompt formats (plain, chat templates, few-shot demos);
- `data_mix`: the DATA-MIX baseline's training rows.

Imports only the foundations at `soups/`'s root.
"""
