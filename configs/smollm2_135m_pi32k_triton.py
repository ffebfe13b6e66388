"""configs/smollm2_135m_pi32k.py with the Triton relation kernel ("pallas_gpu") instead of "auto".

Table 1's SmolLM2 rows up to the ninth session trained through the Triton kernel, which "auto" picked
at head dim 64 until then; "auto" now picks the Mosaic GPU kernel there (the same loss to bf16
rounding, docs/recipe.md). The remaining rows take this config so that every LinearARD stage in the
table ran the same kernel (docs/gpu_runbook.md):

  python -m experiments.table1_real --config configs/smollm2_135m_pi32k_triton.py ...
"""

from configs import smollm2_135m_pi32k


def get_config():
    c = smollm2_135m_pi32k.get_config()
    c.loss.kernel_impl = "pallas_gpu"
    return c
