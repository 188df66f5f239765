using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Training;
using DistDiffusion.Tests.Checkpoints;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

/// <summary>Every training step runs in a dispose scope: N steps leave the number of live tensors unchanged.</summary>
[Collection(TensorAccountingCollection.Name)]
public sealed class TrainingLeakTests
{
    private static Recipe TinyMlp => Recipes.SwissRoll with { HiddenSize = 32, BatchSize = 16, SyntheticSize = 64, Steps = 10, Seed = 5 };

    [Fact]
    public void TrainingStepsLeakNoTensors()
    {
        var recipe = TinyMlp;
        using var train = new Dataset(Synthetic2D.SwissRoll(64, 1), "swiss roll");
        using var state = TrainingState.Create(recipe, [2], train.Count, CPU);
        using var trainer = new LocalTrainer(state, train, Path.Combine(Path.GetTempPath(), "unused-" + Guid.NewGuid()));
        trainer.TrainStep(); // warm-up: gradients are allocated on the first backward
        GC.Collect();
        GC.WaitForPendingFinalizers();
        var before = Tensor.TotalCount;
        for (var i = 0; i < 10; i++) trainer.TrainStep();
        var after = Tensor.TotalCount;
        Assert.Equal(before, after);
        Assert.Equal(11, state.StepsDone);
    }

    [Fact]
    public void DistributedStepsLeakNoTensorsOnWorkerOrCoordinator()
    {
        var recipe = TinyMlp;
        using var worker = DistDiffusion.Worker.WorkerModel.Load(recipe.ToJson(), CPU);
        var train = worker.Train(recipe.SyntheticSize);   // synthetic data: the whole generated set is the training split
        using var state = TrainingState.Create(recipe, [2], train.Count, CPU);
        var coordinatorVector = ParameterVector.Of(state.Network);
        var gradient = new byte[coordinatorVector.Elements * 4];
        void Step()
        {
            // Coordinator -> worker: parameters; worker: gradient of a slice; coordinator: apply it.
            var values = coordinatorVector.ReadValues();
            worker.Vector.WriteValues(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(values));
            var plan = state.PlanStep();
            var keys = state.TrainingStep.SampleKeys(plan.Step, plan.Indices, plan.Epochs);
            var (present, _) = worker.Gradient(train, MicroBatchTree.For(recipe).Root, plan.Indices, keys, gradient);
            coordinatorVector.WriteGradients(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(gradient), present);
            state.ApplyGradients(plan);
        }
        Step();   // warm-up: gradients are allocated on the first backward
        GC.Collect();
        GC.WaitForPendingFinalizers();
        var before = Tensor.TotalCount;
        for (var i = 0; i < 10; i++) Step();
        Assert.Equal(before, Tensor.TotalCount);
        Assert.Equal(11, state.StepsDone);
    }
}
