"""Head-selection policies, one class per module, registered by name (`registry`): statistics in, a plan out; their
calibration (`calibration`) and random controls of the same size with the rule that says whether a policy chose well
(`controls`)."""
