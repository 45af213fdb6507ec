import pytest

from orca2.answers import extract_answer, gold_value, infer_answer_type, is_correct


@pytest.mark.parametrize("response, expected", [
    ("so she has 18 left.\n#### 18", "18"),
    ("The answer is 72.", "72"),
    ("The answer is: 72 apples", "72"),
    ("Final answer: $1,234", "1234"),
    ("We get \\boxed{72}.", "72"),
    ("so x = \\boxed{\\frac{1}{2}}", "1/2"),
    ("The answer is \\boxed{\\dfrac{6}{3}}", "2"),
    ("72 apples", "72"),
    ("1,234", "1234"),
    ("3 + 4 = 7, then 7 * 2 = 14. So 14.", "14"),
    ("The answer is -5.", "-5"),
    ("Answer: 2.50", "2.5"),
    ("It costs $40.00 in total. The answer is $40.00", "40"),
])
def test_numbers(response, expected):
    assert extract_answer(response, "number").value == expected


@pytest.mark.parametrize("response", ["(B)", "Answer: B", "B)", "The answer is (B).", "The answer is: B", "B",
                                      "Looking at (A) and (C), neither works. The answer is (B)", "I pick option B"])
def test_choices(response):
    assert extract_answer(response, "choice").value == "B"
    assert is_correct(response, "(B)")


@pytest.mark.parametrize("response, gold, ok", [
    ("Yes", "Yes", True), ("yes, it did.", "Yes", True), ("The answer is: No", "No", True), ("No.", "yes", False),
    ("True", "True", True), ("The expression evaluates to False.", "False", True), ("true", "False", False),
    ("The answer is: dune kettle raven", "dune kettle raven", True), ("Dune Kettle Raven.", "dune kettle raven", True),
    ("The answer is 2021-03-04.", "2021-03-04", True), ("invalid", "valid", False), ("", "3", False),
])
def test_yes_no_true_false_text(response, gold, ok):
    assert is_correct(response, gold) is ok


def test_gold_normalisation_and_types():
    assert gold_value("(C)", "choice") == "C" and gold_value("1,000", "number") == "1000"
    assert infer_answer_type("(A)") == "choice" and infer_answer_type("-3") == "number"
    assert infer_answer_type("valid") == "text" and infer_answer_type("No") == "yes_no"
    assert extract_answer("no digits here", "number").value is None
