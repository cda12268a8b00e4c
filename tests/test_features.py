"""The one feature recorder (clcli.features): module outputs, module inputs and graph nodes no module outputs."""
import pytest
import timm
import torch

from clcli.features import FeatureRecorder


def test_records_a_module_output_an_input_and_a_graph_node_of_the_last_forward():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=5).eval()
    seen = {}
    net.layer1.register_forward_hook(lambda m, i, o: seen.__setitem__("layer1", o))
    net.fc.register_forward_pre_hook(lambda m, i: seen.__setitem__("fc_in", i[0]))
    recorder = FeatureRecorder()
    recorder.output_of("layer1", net.layer1)
    recorder.input_of("pooled", net.get_classifier())
    net(torch.randn(2, 3, 32, 32))
    assert torch.equal(recorder["layer1"], seen["layer1"]) and torch.equal(recorder["pooled"], seen["fc_in"])

    # the residual add of the last block before its activation: no module outputs it, so it is spliced (fx)
    net.layer2[0].conv1.register_forward_pre_hook(lambda m, i: seen.__setitem__("layer2_in", i[0]))
    blocks = len(net.layer1)
    last_add = "add" if blocks == 1 else f"add_{blocks - 1}"  # fx names the adds add, add_1, ... in order
    recorder.at_nodes(net, {last_add: "residual"}, what="a test recording")
    x = torch.randn(3, 3, 32, 32)
    logits = net(x)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(torch.relu(recorder["residual"]), seen["layer2_in"])  # layer1's output = act(add)
    torch.testing.assert_close(net(x), logits)  # recording is a pass-through
    recorder.remove()
    net(torch.randn(4, 3, 32, 32))
    assert recorder["pooled"].shape[0] == 3  # hooks removed: the last recording stays, nothing new comes


def test_reading_a_key_nothing_was_recorded_under_says_so():
    with pytest.raises(KeyError, match="nothing recorded under 'x'"):
        FeatureRecorder()["x"]
