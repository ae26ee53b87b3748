"""A tiny registered TFDS dataset for the tests of `data.dataset='tfds'`."""

import tensorflow_datasets as tfds


class TinyQa(tfds.core.GeneratorBasedBuilder):
  """Questions q<i> with answers ' a<i>'."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            'question': tfds.features.Text(),
            'answer': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(20),
            'test': self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'question': f'q{i}', 'answer': f' a{i}'}
