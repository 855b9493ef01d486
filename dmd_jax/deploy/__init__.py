"""The deployed edge: the edge model and its router as one ONNX graph that runs without JAX.

The artifact (a directory the `export_edge` job writes) holds

- `edge.onnx` (and `edge_int8.onnx`, statically quantised with calibration clips): inputs
  `clips`, uint8 `(batch, T, H, W, 3)` as the edge stores them, and every normalisation
  parameter the cloud may send (`norm_affine/<flax path>`, and with running statistics
  `stats/<flax path>`); outputs `logits`, `features` and the router's `scores`;
- `norm_parameters.npz`: the values of those inputs the edge starts from;
- `deployed_edge.json` (written last): classes, clip shape, the normalisation mode, the
  operating point's threshold, the input names and shapes, the files' digests and the
  stamp of the models it came from.

`runtime.DeployedEdge` runs it (numpy and the engine only: ONNX Runtime, or OpenVINO,
which reads the same ONNX file) and swaps in downloaded normalisation parameters
atomically between batches. The graph is built through PyTorch
(`torch_edge`): the converter's rules run backwards put the weights into the PyTorch
reference architecture, whose NCDHW convolutions ONNX Runtime runs fast (see
BENCHMARKS.md "Edge export" for the measurement that chose this route over jax2onnx).

**The protocols.** A model family is exportable when its converter module
(`dmd_jax.convert.<name>`) defines `torch_model(module, input_shape)` (the PyTorch
reference, which `mapping.to_state_dict` fills) and `torch_outputs(net, x)` (its
`(logits, features)`); a router is exportable when its module defines
`torch_score(router)`, a `torch.nn.Module` mapping `(features, logits)` to the scores its
JAX `score` computes.
"""
