"""KL-regularised RL, the pure part: no Ray here (the live loop in actors/ and cluster/ wraps it).

The target is the posterior of the RLHF-as-inference view, π*(x) ∝ π0(x)·exp(r(x)/β): maximising
E_πθ[r] − β·KL(πθ‖π0) is minimising KL(πθ‖π*) up to a constant. The modules:

- ``toy``        a problem small enough to enumerate: every completion, its exact log-prob under a
                 Transformer with sampling restricted to an alphabet, π*, exact KLs and TV
- ``reward``     reward functions ``(prompt_text, completion_text) -> float`` by import path
- ``toy_policy`` the toy's π0: a small Transformer trained on a fixed corpus, exported
- ``rollout``    in-process sampling with per-token log-probs, and the in-process reference loop
- ``objective``  the estimator: RLOO with the sequence-level KL in the reward, truncated IS
- ``buffer``     sample staleness: a pure state machine keyed by the version that made each sample
- ``dpo``        the preference pairs the toy implies (Bradley–Terry at β), for DPO against π*
"""
