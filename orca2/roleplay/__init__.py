"""Role-play's components: the BigFive facets, their 35 numbers and rules (traits), and inference by a judge
(bigfive) — used by the persona stages and by OrcaBench in eval."""
