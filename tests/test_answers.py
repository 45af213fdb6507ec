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


@pytest.mark.parametrize("response,expected", [
    ("So the answer is 9 * 2 = 18", "18"),  # a worked line after the marker: its result, not its first operand
    ("Answer: 16 - 3 - 4 = 9 eggs", "9"),
    ("The answer is $5 x 3 = $15 = 15 dollars.", "15"),
    ("The answer is 2.5 * 4 = 10.", "10"),
    ("The answer is 18, because 9 = 3 * 3", "18"),  # an '=' in the explanation is not the result
    ("The answer is 12. Check: 2+2=4", "12"),
])
def test_a_marked_worked_line_gives_its_result(response, expected):
    assert extract_answer(response, "number").value == expected


@pytest.mark.parametrize("response,expected", [
    ("She answered 12 questions and got 5 wrong, so 7 were right.", "7"),  # 'answered' is not a marker
    ("To answer this, we need 3 steps. 4 + 4 = 8, then 8 * 2 = 16", "16"),  # nor is 'to answer this'
    ("Answers vary. The total is 30", "30"),
])
def test_the_word_answer_is_a_marker_only_with_is_or_a_colon(response, expected):
    assert extract_answer(response, "number").value == expected


def test_a_spaced_slash_is_division_not_a_fraction():
    assert extract_answer("It takes 520 / 3 days", "number").value == "3"  # the last number, never '520/3'
    assert extract_answer("The answer is 520 / 3 days", "number").value == "520"
    assert extract_answer("The answer is 3/4", "number").value == "3/4"  # a written fraction stays one


def test_score_is_the_one_check():
    from orca2.answers import score

    s = score("Answer: 16 - 3 - 4 = 9 eggs", "9")
    assert s.correct and s.value == "9" and s.expected == "9" and s.method == "answer-is" and s.answer_type == "number"
    assert not score("no idea", "(B)").correct and score("(B) it is", "(B)").correct
    assert not score("42", None).correct  # no gold: never correct
