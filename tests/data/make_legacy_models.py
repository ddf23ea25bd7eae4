"""Saves small models built with tf_moe 0.1's `MoE` / `HierarchicalMoE` (legacy files)."""
import os, sys
import keras
import numpy as np
import tf_moe

out = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 5, 6)).astype("float32")
x[0, 3:] = 0.0  # masked by the Masking layer
x[2, 1] = 0.0

def build(name, layer):
    inputs = keras.Input((5, 6))
    h = keras.layers.Masking(0.0)(inputs)
    model = keras.Model(inputs, layer(h), name=name)
    wrng = np.random.default_rng(1)
    for v in model.weights:
        v.assign(wrng.standard_normal(v.shape).astype("float32") * 0.7)
    return model

models = {
    "legacy_moe": tf_moe.MoE(4, 2, 8, capacity_factor=1.25, noise_epsilon=0.02, seed=1, name="moe"),
    "legacy_moe_softmax": tf_moe.MoE(3, 1, 8, output_units=4, gate="softmax", noisy_gating=False, name="moe_softmax"),
    "legacy_moe_batchwise": tf_moe.MoE(4, 2, 8, gate="batchwise", name="bw"),
    "legacy_hierarchical_moe": tf_moe.HierarchicalMoE(2, 2, 1, 2, hidden_units=8, name="hmoe"),
}
np.save(os.path.join(out, "legacy_inputs.npy"), x)
for name, layer in models.items():
    model = build(name, layer)
    y = model.predict(x, verbose=0)
    model.save(os.path.join(out, f"{name}.keras"))
    np.save(os.path.join(out, f"{name}_outputs.npy"), y)
    print(name, y.shape, float(np.abs(y).mean()))

from tf_moe.distribute import ExpertParallelMoE
model = build("legacy_expert_parallel_moe", ExpertParallelMoE(4, 2, 8, noisy_gating=False, name="ep"))
y = model.predict(x, verbose=0)
model.save(os.path.join(out, "legacy_expert_parallel_moe.keras"))
np.save(os.path.join(out, "legacy_expert_parallel_moe_outputs.npy"), y)
print("ep", float(np.abs(y).mean()))
