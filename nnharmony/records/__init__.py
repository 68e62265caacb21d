"""The shared contracts, one typed home each, on the ground floor (imports nothing above ``utils`` and ``paths``).

* :mod:`.joint_plan`: :class:`~.joint_plan.JointPlan`, the view of the joint plans' ``"nnharmony"`` record
  (members, their plans and data identifiers, extends, the methods' records) -- the only reader and writer of it.
* :mod:`.method_config`: :class:`~.method_config.MethodConfig`, the base of the three methods' configs (from and
  to plans, from a checkpoint, compatibility check).
* :mod:`.model_folder`: the model-folder path convention, the checkpoint format and the trainer lookup.
"""
