namespace DistDiffusion.Model.Data;

public enum DatasetKind
{
    SwissRoll,
    TwoMoons,
    Gaussians8,
    /// <summary>IDX files (MNIST layout) at DataPath.</summary>
    Mnist,
    /// <summary>IDX files (Fashion-MNIST layout) at DataPath.</summary>
    FashionMnist,
    /// <summary>A folder of PNG/JPEG images at DataPath, resized and centre-cropped to ImageSize.</summary>
    ImageFolder,
}
