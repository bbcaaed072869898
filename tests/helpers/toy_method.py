"""A method defined outside the package, as a user's plug-in would be: SupOnly whose teacher
trains twice as many epochs (`tests/test_method_registry.py` registers it)."""

from stpp_ray.methods.base import SUPERVISED, Method
from stpp_ray.methods.self_training import teacher_fingerprint


class LongSupOnly(Method):
    def stages(self, cfg, build):
        epochs = 2 * cfg.train.epochs
        return [build.data(), build.train("teacher", teacher_fingerprint(cfg) + "-long", kind=SUPERVISED,
                                          epochs=epochs, checkpoint_epochs=[epochs])]

    def final_stage(self, cfg):
        return "teacher"


TOY = LongSupOnly("toy", "SupOnly, twice the epochs", uses_unlabeled=False)
